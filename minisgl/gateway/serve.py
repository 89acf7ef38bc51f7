"""`minisgl gateway`: bind the listening sockets, then serve the app until interrupted.
Importing this module needs no aiohttp, so that a missing extra is one clear line."""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Sequence

from minisgl.gateway.upstream import Credentials

log = logging.getLogger(__name__)


def listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address of `host` (as aiohttp binds them), made here so
    that a bad host or a busy port is one clear ValueError before anything starts."""
    where = f"{host}:{port}"
    if not 1 <= port <= 65535:
        raise ValueError(f"gateway --port: {port} is not a port (1..65535)")
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, UnicodeError) as e:
        raise ValueError(f"gateway --host: cannot resolve {host!r} ({e})") from None
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not SO_REUSEPORT
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
    except OSError as e:
        for sock in socks:
            sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"gateway: cannot listen on {where}: the port is in use") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise ValueError(
                f"gateway --host: cannot listen on {where}: not an address of this machine"
            ) from None
        raise ValueError(f"gateway: cannot listen on {where}: {e.strerror or e}") from None
    return socks


def run_gateway(
    target: str,
    host: str,
    port: int,
    upstream: Credentials | None = None,
    https: tuple[str, str] | None = None,
    api_keys: Sequence[str] = (),
    metrics_port: int | None = None,
) -> int:
    """Serve until interrupted (SIGINT / SIGTERM). ValueError (one line) if it cannot listen.

    `upstream`: how to call the server (TLS, the gateway's key); `https`: (certificate, key)
    files to serve HTTPS with; `api_keys`: the keys clients must send (none: no check);
    `metrics_port`: serve Prometheus metrics on host:metrics_port/metrics (None: off)."""
    try:
        from aiohttp import web
    except ImportError:
        log.error("the HTTP gateway needs aiohttp: pip install 'minisgl[http]'")
        return 2
    from minisgl.gateway.app import build_app
    from minisgl.server.security import server_ssl_context

    creds = upstream or Credentials()
    ssl_context = None if https is None else server_ssl_context(*https)
    socks = listen(host, port)
    metrics = metrics_server = None
    if metrics_port is not None:
        from minisgl.gateway.metrics import GatewayMetrics
        from minisgl.metrics import MetricsServer

        metrics = GatewayMetrics()
        try:
            metrics_server = MetricsServer(host, metrics_port, metrics.registry)
        except ValueError:
            for sock in socks:
                sock.close()
            raise
        log.info("gateway metrics on http://%s:%d/metrics", host, metrics_port)
    log.info(
        "OpenAI-compatible gateway on %s://%s:%d (%s) -> gRPC %s (%s, %s)",
        "http" if https is None else "https",
        host,
        port,
        f"{len(api_keys)} API keys" if api_keys else "no API key",
        target,
        "plaintext" if creds.tls is None else "TLS",
        "no key" if creds.api_key is None else "with --target-api-key",
    )
    try:
        web.run_app(
            build_app(target, credentials=creds, api_keys=api_keys, metrics=metrics),
            sock=socks,
            ssl_context=ssl_context,
            print=None,
            access_log=None,
            handler_cancellation=True,  # a client that disconnects cancels its calls
        )
    finally:
        if metrics_server is not None:
            metrics_server.close()
    return 0
