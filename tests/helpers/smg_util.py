"""smg (the Shepherd Model Gateway, the `smg` binary of the smg wheel) in front of `minisgl
serve` replicas for tests: replicas on chosen ports, the gateway as a subprocess, bounded
waits, cleanup by PID, and the shared-prefix workload of the routing test."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from smg_grpc_proto import sglang_scheduler_pb2 as sgl
from smg_grpc_proto import sglang_scheduler_pb2_grpc as sgl_grpc
from smg_grpc_proto.generated import common_pb2 as smg_common

from tests.helpers.server_util import REPO, STOP_S, Server, free_port, wait_until

SMG_STARTUP_S = 180.0


def smg_binary() -> str:
    """The `smg` launcher of this interpreter's environment (the test extra installs it)."""
    found = shutil.which("smg", path=str(Path(sys.executable).parent)) or shutil.which("smg")
    if found is None:
        raise AssertionError("no smg binary: pip install -e '.[test]' installs the smg wheel")
    return found


def start_replica(workdir: Path, port: int, *flags: str) -> Server:
    """`minisgl serve --port port` with its log in workdir (not waited for: wait_serving)."""
    tmpdir = workdir / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "server.log"
    env = dict(os.environ)
    env["TMPDIR"] = str(tmpdir)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "minisgl.cli", "serve", "--port", str(port), "--no-progress"]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [*cmd, *flags], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    return Server(port, proc, log_path, tmpdir)


def stop_replica(server: Server) -> None:
    try:
        server.terminate()
    finally:
        server.kill()


@contextlib.contextmanager
def run_replicas(workdir: Path, count: int, *flags: str) -> Iterator[list[Server]]:
    """`count` replicas started together (their start-ups overlap), not waited for
    (Server.wait_serving)."""
    servers: list[Server] = []
    try:
        for i in range(count):
            replica_dir = workdir / f"replica{i}"
            replica_dir.mkdir(parents=True, exist_ok=True)
            servers.append(start_replica(replica_dir, free_port(), *flags))
        yield servers
    finally:
        stop_replicas(servers)


def stop_replicas(servers: Sequence[Server]) -> None:
    """SIGTERM them all, then wait for each (their drains overlap)."""
    for s in servers:
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
    for s in servers:
        stop_replica(s)


@dataclass
class Gateway:
    """A running `smg launch` process."""

    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    metrics_port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        """(HTTP status, parsed JSON body or None) of GET path; status 0 if no answer."""
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=timeout) as resp:
                body = resp.read()
                status = resp.status
        except urllib.error.HTTPError as e:
            body, status = e.read(), e.code
        except (urllib.error.URLError, OSError):
            return 0, None
        try:
            return status, json.loads(body)
        except ValueError:
            return status, None

    def metrics(self) -> dict[str, float]:
        """smg's Prometheus samples, by their line's name and labels."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as resp:
            text = resp.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def healthy_workers(self) -> set[str]:
        """The worker URLs smg counts healthy now."""
        status, body = self.get("/workers")
        if status != 200 or not isinstance(body, dict):
            return set()
        return {w["url"] for w in body.get("workers", []) if w.get("is_healthy")}

    def wait_workers(self, urls: Sequence[str], timeout: float = SMG_STARTUP_S) -> None:
        """Until exactly `urls` are healthy in smg."""
        want = set(urls)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"smg exited with {self.proc.returncode}:\n{self.log()}")
            return self.healthy_workers() == want

        wait_until(ready, timeout, f"smg to see healthy workers {sorted(want)}", 0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def worker_url(server: Server) -> str:
    return f"grpc://127.0.0.1:{server.port}"


@contextlib.contextmanager
def run_smg(workdir: Path, replicas: Sequence[Server], *flags: str) -> Iterator[Gateway]:
    """`smg launch --backend sglang` on a free port in front of `replicas` (gRPC), waited
    for until every replica is healthy in it; SIGTERM then SIGKILL on exit. Health is probed
    every second so that a dead replica leaves, and a restarted one returns, within seconds.
    """
    port, metrics_port = free_port(), free_port()
    log_path = workdir / f"smg-{port}.log"
    cmd = [
        smg_binary(),
        "launch",
        "--backend",
        "sglang",
        "--worker-urls",
        *(worker_url(r) for r in replicas),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--prometheus-port",
        str(metrics_port),
        "--worker-startup-check-interval",
        "1",
        "--health-check-interval-secs",
        "1",
        "--health-failure-threshold",
        "1",
        "--health-success-threshold",
        "1",
        "--shutdown-grace-period-secs",
        "1",  # its in-flight requests are the tests' own, done by then
        "--log-level",
        "info",
        *flags,
    ]
    env = dict(os.environ, NO_COLOR="1")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    gw = Gateway(port, proc, log_path, metrics_port)
    try:
        gw.wait_workers([worker_url(r) for r in replicas])
        yield gw
    finally:
        gw.stop()


def sglang_stub(server: Server) -> tuple[grpc.Channel, Any]:
    ch = grpc.insecure_channel(server.target)
    return ch, sgl_grpc.SglangSchedulerStub(ch)


def cached_tokens(server: Server) -> int:
    """The replica's prompt tokens served from its prefix cache since start (GetServerInfo)."""
    ch, stub = sglang_stub(server)
    with ch:
        info = stub.GetServerInfo(sgl.GetServerInfoRequest(), timeout=10)
    return int(info.scheduler_info["cached_tokens"])


def flush(server: Server) -> None:
    ch, stub = sglang_stub(server)
    with ch:
        resp = stub.FlushCache(smg_common.FlushCacheRequest(timeout_s=10), timeout=30)
    assert resp.success, resp.message


def shared_prefix_prompts(groups: int, per_group: int, words: int, seed: int = 0) -> list[str]:
    """`groups` long prefixes (`words` words each), `per_group` prompts on each (the prefix and
    a short question), in a shuffled order so that no fixed rotation follows the groups."""
    rng = random.Random(seed)
    vocab = ["alpha", "river", "stone", "cloud", "maple", "ember", "quartz", "delta", "north"]
    vocab += ["harbor", "violet", "cinder", "orbit", "meadow", "falcon", "copper", "lantern"]
    prefixes = [
        f"Document {g}: " + " ".join(rng.choice(vocab) for _ in range(words)) for g in range(groups)
    ]
    prompts = [f"{p} Question {q}: what comes next?" for p in prefixes for q in range(per_group)]
    rng.shuffle(prompts)
    return prompts


@dataclass
class WorkloadResult:
    """One pass of a workload through an OpenAI endpoint."""

    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    seconds: float

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds

    def line(self, label: str) -> str:
        return (
            f"{label}: {self.requests} requests in {self.seconds:.2f} s, "
            f"{self.output_tokens_per_s:,.0f} output tok/s, cache hit rate {self.hit_rate:.1%} "
            f"({self.cached_tokens} of {self.prompt_tokens} prompt tokens)"
        )


def run_workload(
    base_url: str, model: str, prompts: Sequence[str], max_tokens: int, concurrency: int
) -> WorkloadResult:
    """Send `prompts` as greedy completions of `max_tokens` tokens (ignore_eos), at most
    `concurrency` in flight, in their order; totals from the responses' usage."""
    import threading
    import time

    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    lock = threading.Lock()
    todo = list(enumerate(prompts))
    totals = [0, 0, 0]

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                _, prompt = todo.pop(0)
            r = client.completions.create(
                model=model,
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=0.0,
                extra_body={"ignore_eos": True},
                timeout=600,
            )
            assert r.usage is not None
            details = r.usage.prompt_tokens_details
            with lock:
                totals[0] += r.usage.prompt_tokens
                totals[1] += (details.cached_tokens or 0) if details is not None else 0
                totals[2] += r.usage.completion_tokens

    start = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(3600)
    return WorkloadResult(len(prompts), *totals, time.monotonic() - start)
