"""Run `minisgl serve` as a subprocess for tests: free port, log file, bounded waits, cleanup."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from minisgl.v1 import model_pb2

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "clients" / "python"))

from minisgl_client import Client, StreamDelta  # noqa: E402

STARTUP_S = 120.0
STOP_S = 60.0

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(
    pred: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05
) -> T:
    """Poll `pred` until it returns something truthy (not None, not False, ...) and return it;
    AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()


def pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def parent_pid(pid: int) -> int | None:
    stat = _stat(pid)
    return None if stat is None else int(stat[1])


def wait_idle(client: Client, timeout: float = 30.0) -> model_pb2.GetLoadResponse:
    """Poll GetLoad until no request is held anywhere and no KV page is held by a request
    (the prefix cache may still hold pages: busy, not usage, must be 0)."""

    def idle() -> model_pb2.GetLoadResponse | None:
        load = client.load()
        done = (
            load.running_requests == 0
            and load.waiting_requests == 0
            and load.inflight_requests == 0
            and load.kv_cache_busy == 0.0
        )
        return load if done else None

    return wait_until(idle, timeout, "the server to be idle (no requests, KV not busy)")


@dataclass
class Server:
    """A running `minisgl serve` process."""

    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    tmpdir: Path
    """The server's TMPDIR (its socket directory is made in here)."""
    health_seen: list[str] = field(default_factory=list)
    """Health states seen while waiting for SERVING, in order (repeats collapsed);
    "no-connection" while the port was not open yet."""
    probe_while_starting: grpc.StatusCode | None = None
    """The status of a GetModelInfo call made while health said NOT_SERVING."""

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def client(self, timeout: float | None = 60.0) -> Client:
        return Client(self.target, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> dict[str, int]:
        """tokenizer / detokenizer / scheduler -> pid, from the log."""
        return {m[1]: int(m[2]) for m in re.finditer(r"(\w+) process pid (\d+)", self.log())}

    def health(self, timeout: float = 5.0) -> str:
        """The server's overall health status name, "no-connection" or "no-answer"."""
        with self.channel() as ch:
            try:
                resp = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=timeout
                )
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    return "no-connection"
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    return "no-answer"
                raise
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    def wait_serving(self, timeout: float = STARTUP_S) -> None:
        """Poll health from the start until SERVING, recording what was seen on the way."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode} during start-up:\n{self.log()}"
                )
            status = self.health(timeout=2.0)
            if not self.health_seen or self.health_seen[-1] != status:
                self.health_seen.append(status)
            if status == "NOT_SERVING" and self.probe_while_starting is None:
                with self.client(timeout=5.0) as c:
                    try:
                        c.model_info()
                        self.probe_while_starting = grpc.StatusCode.OK
                    except grpc.RpcError as e:
                        self.probe_while_starting = e.code()
            if status == "SERVING" and f"listening on {self.target}" in self.log():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"server not SERVING after {timeout:.0f} s:\n{self.log()}")
            time.sleep(0.05)

    def terminate(self, timeout: float = STOP_S) -> int:
        """SIGTERM, wait up to `timeout` s, then SIGKILL; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"server did not exit {timeout:.0f} s after SIGTERM") from None

    def kill(self) -> None:
        """SIGKILL the server's workers (still its children) and the server, if alive."""
        if self.proc.poll() is None:
            for pid in self.worker_pids().values():
                if parent_pid(pid) == self.proc.pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


@contextlib.contextmanager
def run_server(workdir: Path, *flags: str, wait: bool = True) -> Iterator[Server]:
    """Start `python -m minisgl.cli serve` on a free port with TMPDIR=workdir/tmp.

    Waits (bounded) for SERVING unless `wait` is False. On exit: SIGTERM, bounded wait,
    SIGKILL of whatever is left.
    """
    tmpdir = workdir / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "server.log"
    port = free_port()
    env = dict(os.environ)
    env["TMPDIR"] = str(tmpdir)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "minisgl.cli", "serve", "--port", str(port), "--no-progress"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*cmd, *flags], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    server = Server(port, proc, log_path, tmpdir)
    try:
        if wait:
            server.wait_serving()
        yield server
    finally:
        try:
            server.terminate()
        finally:
            server.kill()


class Streamer(threading.Thread):
    """Consumes one StreamGenerate call in a thread, recording deltas and the final status."""

    def __init__(self, server: Server, prompt: str, timeout: float = 120, **options: Any) -> None:
        super().__init__(daemon=True)
        self.client = server.client()
        self.args = (prompt, timeout, options)
        self.deltas: list[StreamDelta] = []
        self.error: grpc.RpcError | None = None
        self.first = threading.Event()

    def run(self) -> None:
        prompt, timeout, options = self.args
        try:
            for delta in self.client.stream(prompt, timeout=timeout, **options):
                self.deltas.append(delta)
                self.first.set()
        except grpc.RpcError as e:
            self.error = e
        finally:
            self.first.set()
            self.client.close()

    @property
    def tokens(self) -> int:
        return sum(len(d.token_ids) for d in self.deltas)


def kill_mid_stream(
    server: Server, worker: str, max_new_tokens: int, timeout: float
) -> grpc.RpcError:
    """SIGKILL `worker` while a greedy stream runs; the stream must end with INTERNAL before
    its last token and health go NOT_SERVING. Returns the stream's error."""
    stream = Streamer(
        server, "doomed", max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True
    )
    stream.start()
    assert stream.first.wait(timeout) and stream.deltas, stream.error
    os.kill(server.worker_pids()[worker], signal.SIGKILL)
    stream.join(timeout)
    assert not stream.is_alive(), f"the stream hangs after {worker} died"
    assert stream.error is not None
    assert stream.error.code() == grpc.StatusCode.INTERNAL, stream.error.details()
    assert stream.tokens < max_new_tokens
    wait_until(lambda: server.health() == "NOT_SERVING", timeout, "health NOT_SERVING")
    return stream.error
