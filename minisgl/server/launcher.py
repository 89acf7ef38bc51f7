"""`minisgl serve`: start the worker processes, run the gRPC frontend, shut down cleanly.

Processes: this one (the frontend, asyncio + grpc.aio, no torch), a tokenizer, a
detokenizer and the scheduler (model + KV cache). They talk over ZeroMQ ipc sockets in a
private temporary directory that is removed on exit. Children die with this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import logging
import multiprocessing
import multiprocessing.process
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from minisgl.config import EngineConfig
from minisgl.distributed.rendezvous import free_port
from minisgl.ipc.messages import Shutdown
from minisgl.ipc.transport import Endpoints, encode
from minisgl.models.source import resolve_model
from minisgl.server.config import ServerConfig

log = logging.getLogger(__name__)

CHILD_JOIN_S = 10.0
FOLLOWER_PREFIX = "scheduler_rank"


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
        force=True,
    )


def _child_main(module: str, fn: str, level: str, args: tuple[Any, ...]) -> None:
    """Entry point of every worker: dies with the parent, leaves signals to the parent."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die if the frontend dies
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(level)
    getattr(importlib.import_module(module), fn)(*args)


class Workers:
    """The worker processes (tokenizer, detokenizer, scheduler and, with --tp-size N, the
    scheduler's other N-1 tensor-parallel ranks) and their shutdown."""

    def __init__(self, cfg: EngineConfig, scfg: ServerConfig, endpoints: Endpoints) -> None:
        ctx = multiprocessing.get_context("spawn")
        specs = {
            "tokenizer": ("minisgl.tokenizer.worker", "run_tokenizer"),
            "detokenizer": ("minisgl.tokenizer.worker", "run_detokenizer"),
            "scheduler": ("minisgl.scheduler.process", "run_scheduler"),
        }
        self.endpoints = endpoints
        self.procs: dict[str, multiprocessing.process.BaseProcess] = {}
        args: dict[str, tuple[Any, ...]] = {name: (cfg, endpoints) for name in specs}
        if cfg.tp_size > 1:  # the other tensor-parallel ranks follow the scheduler (rank 0)
            port = free_port()
            args["scheduler"] = (cfg, endpoints, port)
            for rank in range(1, cfg.tp_size):
                name = f"{FOLLOWER_PREFIX}{rank}"
                specs[name] = ("minisgl.scheduler.setup", "run_follower")
                args[name] = (cfg, rank, port)
        for name, (module, fn) in specs.items():
            proc = ctx.Process(
                target=_child_main,
                args=(module, fn, scfg.log_level, args[name]),
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
        message (we would wait CHILD_JOIN_S for nothing): it is killed at once instead.
        """
        import zmq

        ctx = zmq.Context()
        for name, proc in self.procs.items():
            if name.startswith(FOLLOWER_PREFIX):
                continue  # no socket: the scheduler stops them as it exits (else killed below)
            if name not in ready:
                if proc.is_alive():
                    log.info("%s is still starting; killing it", name)
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


async def _serve(cfg: EngineConfig, scfg: ServerConfig, endpoints: Endpoints) -> int:
    from minisgl.server.frontend import Frontend, build_server

    fe = Frontend(scfg, endpoints)
    server = build_server(fe)
    address = f"{scfg.host}:{scfg.port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    await fe.set_health(False)
    await server.start()
    log.info("listening on %s (NOT_SERVING until the model is warm)", address)
    workers = Workers(cfg, scfg, endpoints)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    receiver = asyncio.create_task(fe.receive_loop())
    code = 0
    try:
        while not stop.is_set():
            if fe.ready.is_set() and fe.state == "starting":
                await fe.mark_serving()
            why = workers.dead()
            if why is not None and fe.state != "failed":
                await fe.fail(why)
                code = 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
        log.info("shutting down: draining %d requests", len(fe.requests))
        await fe.drain()
        deadline = time.monotonic() + scfg.shutdown_grace_s
        while fe.requests and time.monotonic() < deadline and workers.dead() is None:
            await asyncio.sleep(0.05)
        await server.stop(grace=1.0)
    finally:
        receiver.cancel()
        workers.stop(fe.ready_workers())
        fe.zmq.destroy(linger=0)
    log.info("stopped")
    return code


def check_model(cfg: EngineConfig) -> None:
    """Fail fast, in this process and before listening: the model resolves and splits."""
    source = resolve_model(cfg.model, cfg.dummy_weights)
    problem = source.config.tp_problem(cfg.tp_size)
    if problem is not None:
        raise ValueError(f"--tp-size: {problem}")


def serve(cfg: EngineConfig, scfg: ServerConfig) -> int:
    """Run the server until SIGTERM/SIGINT; returns the process exit code."""
    check_model(cfg)
    setup_logging(scfg.log_level)
    root = Path(tempfile.mkdtemp(prefix="minisgl-"))
    os.chmod(root, 0o700)
    try:
        try:
            import uvloop

            return uvloop.run(_serve(cfg, scfg, Endpoints(root)))
        except ImportError:
            return asyncio.run(_serve(cfg, scfg, Endpoints(root)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
