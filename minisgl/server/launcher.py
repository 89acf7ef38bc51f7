"""`minisgl serve`: start the worker processes, run the gRPC frontend, shut down cleanly.

Processes: this one (the frontend, asyncio + grpc.aio, no torch), a tokenizer, a
detokenizer and the scheduler (model + KV cache). They talk over ZeroMQ ipc sockets in a
private temporary directory that is removed on exit. Children die with this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import importlib
import json
import logging
import multiprocessing
import multiprocessing.process
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Collection
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minisgl.config import EngineConfig
from minisgl.distributed.rendezvous import free_port
from minisgl.ipc.messages import Shutdown
from minisgl.ipc.transport import Endpoints, encode
from minisgl.models.source import ModelSource, resolve_model
from minisgl.server.config import ServerConfig

if TYPE_CHECKING:
    import grpc

    from minisgl.server.metrics import RpcMetrics

log = logging.getLogger(__name__)

CHILD_JOIN_S = 10.0
PREFLIGHT_S = 300.0
"""Longest the device check may take (it imports torch and the backend's library)."""
FOLLOWER_PREFIX = "scheduler_rank"


TEXT_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, process, logger, message, the record's
    `fields` (the request and throughput lines pass theirs in `extra`), and any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "process": record.processName,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr at `level`, as text lines or (log_format "json") JSON lines."""
    handler = logging.StreamHandler()
    json_lines = log_format == "json"
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _child_main(
    module: str, fn: str, level: str, args: tuple[Any, ...], log_format: str = "text"
) -> None:
    """Entry point of every worker: dies with the parent, leaves signals to the parent."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die if the frontend dies
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(level, log_format)
    getattr(importlib.import_module(module), fn)(*args)


class Workers:
    """The worker processes (tokenizer, detokenizer, scheduler and, with --tp-size N, the
    scheduler's other N-1 tensor-parallel ranks) and their shutdown."""

    def __init__(
        self,
        cfg: EngineConfig,
        scfg: ServerConfig,
        endpoints: Endpoints,
        metrics_dir: str | None = None,
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        specs = {
            "tokenizer": ("minisgl.tokenizer.worker", "run_tokenizer"),
            "detokenizer": ("minisgl.tokenizer.worker", "run_detokenizer"),
            "scheduler": ("minisgl.scheduler.process", "run_scheduler"),
        }
        self.endpoints = endpoints
        self.procs: dict[str, multiprocessing.process.BaseProcess] = {}
        args: dict[str, tuple[Any, ...]] = {name: (cfg, endpoints) for name in specs}
        telemetry = (metrics_dir, scfg.log_stats_interval_s)
        args["scheduler"] = (cfg, endpoints, None, *telemetry)
        if cfg.tp_size > 1:  # the other tensor-parallel ranks follow the scheduler (rank 0)
            port = free_port()
            args["scheduler"] = (cfg, endpoints, port, *telemetry)
            for rank in range(1, cfg.tp_size):
                name = f"{FOLLOWER_PREFIX}{rank}"
                specs[name] = ("minisgl.scheduler.engine", "run_follower")
                args[name] = (cfg, rank, port)
        for name, (module, fn) in specs.items():
            proc = ctx.Process(
                target=_child_main,
                args=(module, fn, scfg.log_level, args[name], scfg.log_format),
                name=name,
                daemon=True,
            )
            proc.start()
            log.info("%s process pid %d", name, proc.pid)
            self.procs[name] = proc

    def dead(self) -> str | None:
        """The name of a worker that has exited, if any."""
        for name, proc in self.procs.items():
            if not proc.is_alive():
                return f"{name} process exited with code {proc.exitcode}"
        return None

    def stop(self, ready: Collection[str]) -> None:
        """Ask each worker in `ready` to exit, then make sure every one has.

        A worker that is still loading has not bound its socket yet and would never get the
        message (we would wait CHILD_JOIN_S for nothing): it is killed at once instead, as is
        every worker after a failure (`ready` empty).
        """
        import zmq

        ctx = zmq.Context()
        for name, proc in self.procs.items():
            if name.startswith(FOLLOWER_PREFIX) and "scheduler" in ready:
                continue  # no socket: the scheduler stops them as it exits (else killed below)
            if name not in ready:
                if proc.is_alive():
                    log.info("%s is not ready or the server failed; killing it", name)
                    proc.kill()
                continue
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 500)
            sock.connect(getattr(self.endpoints, name))
            sock.send(encode(Shutdown()), flags=zmq.NOBLOCK)
            sock.close()
        ctx.term()
        deadline = time.monotonic() + CHILD_JOIN_S
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        for name, proc in self.procs.items():
            if proc.is_alive():
                log.warning("%s did not exit; killing it", name)
                proc.kill()
                proc.join(5)


async def _serve(
    cfg: EngineConfig, scfg: ServerConfig, endpoints: Endpoints, source: ModelSource
) -> int:
    """With --metrics-port, the metrics endpoint around `_serve_grpc` (minisgl.metrics: the
    scheduler writes its metrics into a directory of the private temporary one, which the
    frontend's endpoint reads with its own)."""
    if scfg.metrics_port is None:
        return await _serve_grpc(cfg, scfg, endpoints, source)
    from minisgl.server.metrics import start_metrics

    metrics_dir = endpoints.root / "metrics"
    metrics_dir.mkdir(mode=0o700)
    metrics, metrics_server = start_metrics(scfg.host, scfg.metrics_port, str(metrics_dir))
    try:
        return await _serve_grpc(cfg, scfg, endpoints, source, metrics, str(metrics_dir))
    finally:
        metrics_server.close()


async def _serve_grpc(
    cfg: EngineConfig,
    scfg: ServerConfig,
    endpoints: Endpoints,
    source: ModelSource,
    metrics: RpcMetrics | None = None,
    metrics_dir: str | None = None,
) -> int:
    from minisgl.server import sglang_service
    from minisgl.server.frontend import Frontend, build_server
    from minisgl.server.sglang_tokenizer import tokenizer_source

    fe = Frontend(scfg, endpoints, metrics)
    # sglang.grpc.scheduler beside minisgl.v1, for smg (server/sglang_service.py)
    tokenizer = tokenizer_source(source, cfg.tokenizer)
    server = build_server(fe, (sglang_service.service(fe, tokenizer),))
    address = grpc_address(scfg.host, scfg.port)
    try:
        if scfg.tls is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, server_credentials(scfg))
    except RuntimeError:  # grpcio raises where older versions returned 0
        bound = 0
    if bound == 0:  # check_address passed, so something took the port since
        fe.zmq.destroy(linger=0)
        raise ValueError(f"--host {scfg.host} --port {scfg.port}: cannot listen on {address}")
    await fe.set_health(False)
    await server.start()
    log.info("listening on %s, %s (NOT_SERVING until the model is warm)", address, _security(scfg))
    workers = Workers(cfg, scfg, endpoints, metrics_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    receiver = asyncio.create_task(fe.receive_loop())
    code = 0
    failed_at: float | None = None
    try:
        while not stop.is_set():
            if fe.ready.is_set() and fe.state == "starting":
                await fe.mark_serving()
            why = workers.dead()
            if why is not None and failed_at is None:
                await fe.fail(why)
                code = 1
                failed_at = time.monotonic()
                log.error("exiting in %.1f s (--exit-grace)", scfg.exit_grace_s)
            if failed_at is not None and time.monotonic() - failed_at >= scfg.exit_grace_s:
                break  # a server that can no longer serve lets its supervisor restart it
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
        log.info("shutting down: draining %d requests", len(fe.requests))
        if failed_at is None:
            await fe.drain()
        deadline = time.monotonic() + scfg.shutdown_grace_s
        while fe.requests and time.monotonic() < deadline and workers.dead() is None:
            await asyncio.sleep(0.05)
        await server.stop(grace=1.0)
    finally:
        receiver.cancel()
        workers.stop(fe.ready_workers() if failed_at is None else ())  # failed: kill the rest
        fe.zmq.destroy(linger=0)
    log.info("stopped")
    return code


def server_credentials(scfg: ServerConfig) -> grpc.ServerCredentials:
    """TLS credentials of the gRPC port; with a client CA, clients must present a certificate
    it signed (mTLS)."""
    import grpc

    tls = scfg.tls
    assert tls is not None and tls.cert is not None and tls.key is not None
    return grpc.ssl_server_credentials(
        [(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=tls.ca is not None
    )


def _security(scfg: ServerConfig) -> str:
    """How the port is protected, for the start-up log (never a key)."""
    tls = "plaintext" if scfg.tls is None else "TLS" if scfg.tls.ca is None else "mTLS"
    keys = len(scfg.api_keys)
    return f"{tls}, {f'{keys} API keys' if keys else 'no API key'}"


def check_model(cfg: EngineConfig) -> ModelSource:
    """Fail fast, in this process and before listening: the model resolves, splits over
    --tp-size and has its weight files. Returns where it comes from."""
    source = resolve_model(cfg.model, cfg.dummy_weights, cfg.revision, cfg.progress)
    problem = source.config.tp_problem(cfg.tp_size)
    if problem is not None:
        raise ValueError(f"--tp-size: {problem}")
    source.check_weights()
    return source


def _preflight_child(cfg: EngineConfig, conn: Connection) -> None:
    """Child process of check_device: sends None, or the reason cfg cannot run here."""
    try:
        from minisgl.engine.preflight import check_device_and_backend

        check_device_and_backend(cfg)
        conn.send(None)
    except ValueError as e:
        conn.send(str(e))
    except Exception as e:  # e.g. a CUDA driver error: still one line, not a traceback
        conn.send(f"--device {cfg.device}: the device check failed: {type(e).__name__}: {e}")
    conn.close()


def check_device(cfg: EngineConfig, level: str) -> None:
    """Fail fast, before listening: the device exists and the attention backend imports and
    runs on it (minisgl.engine.preflight). That needs torch, which this process never imports,
    so it runs in a short-lived child; only when cfg names something that may be missing
    (the defaults, auto device and backend, fall back to what is there)."""
    if cfg.device in ("auto", "cpu") and cfg.attention_backend in ("auto", "torch"):
        return
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    args = ("minisgl.server.launcher", "_preflight_child", level, (cfg, send))
    proc = ctx.Process(target=_child_main, args=args, name="preflight", daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(PREFLIGHT_S):
            raise ValueError(
                f"--device {cfg.device}: the device check took over {PREFLIGHT_S:.0f} s"
            )
        try:
            problem = recv.recv()
        except EOFError:
            proc.join(CHILD_JOIN_S)
            problem = f"--device {cfg.device}: the device check exited with code {proc.exitcode}"
    finally:
        recv.close()
        proc.join(CHILD_JOIN_S)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if problem is not None:
        raise ValueError(problem)


def grpc_address(host: str, port: int) -> str:
    """host:port as gRPC reads it (an IPv6 address in brackets)."""
    bare = host.removeprefix("[").removesuffix("]")
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"


def check_address(host: str, port: int) -> None:
    """Fail fast, before listening: `host` is an address of this machine and no process
    listens on `port` there.

    gRPC binds with SO_REUSEPORT, so without this check a second server on a busy port would
    start and share the port with the first (connections alternating between them). The probe
    sets SO_REUSEADDR as gRPC does, so it fails where gRPC's bind would, and also where a
    server listens: connections of a previous server in TIME_WAIT do not count.
    """
    bare = host.removeprefix("[").removesuffix("]")
    try:
        infos = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    bindable = 0
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(addr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise ValueError(f"--port {port}: already in use on {host}") from None
                if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    continue
                raise ValueError(f"--host {host} --port {port}: cannot listen ({e})") from None
            bindable += 1
    if bindable == 0:
        raise ValueError(f"--host {host}: not an address of this machine")


def serve(cfg: EngineConfig, scfg: ServerConfig) -> int:
    """Run the server until SIGTERM/SIGINT; returns the process exit code.

    What can be checked before listening is (ValueError / ModelLoadError, one line each):
    the model, its weight files and --tp-size, the device and attention backend, the address.
    """
    source = check_model(cfg)
    check_device(cfg, scfg.log_level)
    check_address(scfg.host, scfg.port)
    if scfg.metrics_port is not None:
        try:
            check_address(scfg.host, scfg.metrics_port)
        except ValueError as e:
            raise ValueError(f"--metrics-port {scfg.metrics_port}: {e}") from None
    setup_logging(scfg.log_level, scfg.log_format)
    root = Path(tempfile.mkdtemp(prefix="minisgl-"))
    os.chmod(root, 0o700)
    try:
        try:
            import uvloop

            return uvloop.run(_serve(cfg, scfg, Endpoints(root), source))
        except ImportError:
            return asyncio.run(_serve(cfg, scfg, Endpoints(root), source))
    finally:
        shutil.rmtree(root, ignore_errors=True)
