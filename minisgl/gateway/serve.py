"""`minisgl gateway`: bind the listening sockets, then serve the app until interrupted.
Importing this module needs no aiohttp, so that a missing extra is one clear line."""

from __future__ import annotations

import errno
import logging
import socket

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


def run_gateway(target: str, host: str, port: int) -> int:
    """Serve until interrupted (SIGINT / SIGTERM). ValueError (one line) if it cannot listen."""
    try:
        from aiohttp import web
    except ImportError:
        log.error("the HTTP gateway needs aiohttp: pip install 'minisgl[http]'")
        return 2
    from minisgl.gateway.app import build_app

    socks = listen(host, port)
    log.info("OpenAI-compatible gateway on http://%s:%d -> gRPC %s", host, port, target)
    web.run_app(
        build_app(target),
        sock=socks,
        print=None,
        access_log=None,
        handler_cancellation=True,  # a client that disconnects cancels its calls
    )
    return 0
