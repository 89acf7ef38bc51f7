"""`minisgl health` (the image's HEALTHCHECK and the Kubernetes exec probe), run as a command
against real servers: a plaintext `minisgl serve` through its life (SERVING, then NOT_SERVING
while it drains, then gone); a gRPC server with serve's TLS credentials whose certificate
names only a Kubernetes Service (probed at 127.0.0.1 with --server-name, from flags or from
the environment), SERVING and not; nothing listening; a port that never answers. mTLS with
API keys: test_security.py, against its server. The certificates are made by its make_pki."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from minisgl.server.config import ServerConfig
from minisgl.server.health_check import ENV, Answer, check
from minisgl.server.launcher import server_credentials
from minisgl.server.security import TlsFiles, load_tls
from tests.helpers.server_util import REPO, Streamer, free_port, run_server, wait_until
from tests.server.test_security import SERVICE_NAME, Pki, make_pki

QUICK_S = 3.0
"""A refused connection or handshake must be reported within this (no waiting for a timeout)."""


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str
    seconds: float


def probe(*args: str, env: dict[str, str] | None = None) -> Run:
    """`minisgl health ARGS` as a command, with no MINISGL_HEALTH_* variable but `env`'s."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MINISGL_HEALTH_")}
    clean["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "minisgl.cli", "health", *args]
    start = time.monotonic()
    proc = subprocess.run(
        cmd, env={**clean, **(env or {})}, capture_output=True, text=True, timeout=60
    )
    return Run(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)


def refused(run: Run, needle: str) -> bool:
    """Exit code 1, quickly, one line on stderr that says `needle`."""
    return (
        run.code == 1
        and run.out == ""
        and needle in run.err
        and run.err.count("\n") == 1
        and run.seconds < QUICK_S
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# ----- plaintext: SERVING, NOT_SERVING while draining, then nothing there -------------------


def test_plaintext_server_through_its_life(tmp_path: Path) -> None:
    with run_server(tmp_path, "--max-model-len", "512", "--shutdown-grace", "60") as server:
        target = ("--target", server.target)
        ok = probe(*target)
        assert (ok.code, ok.out, ok.err) == (0, "SERVING\n", ""), ok
        service = probe(*target, "--service", "minisgl.v1.GenerationService")
        assert service.code == 0 and service.out == "SERVING\n", service
        unknown = probe(*target, "--service", "no.such.Service")
        assert refused(unknown, "no.such.Service: NOT_FOUND"), unknown
        # Draining (SIGTERM with a request in flight): NOT_SERVING, so exit 1.
        stream = Streamer(server, "a long one", max_new_tokens=400, ignore_eos=True)
        stream.start()
        try:
            assert stream.first.wait(60) and stream.deltas, stream.error
            server.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: server.health() == "NOT_SERVING", 10, "NOT_SERVING")
            draining = probe(*target)
            assert refused(draining, "NOT_SERVING"), draining
            assert stream.is_alive(), "the stream ended before the check: the test proves less"
        finally:
            stream.client.close()  # cancels the stream, so that the server stops now
            stream.join(30)
        assert server.proc.wait(30) == 0
        gone = probe(*target)
        assert refused(gone, "UNAVAILABLE"), gone


def test_nothing_listening_is_1_at_once() -> None:
    run = probe("--target", f"127.0.0.1:{free_port()}", "--timeout", "30")
    assert refused(run, "UNAVAILABLE"), run


def test_a_port_that_never_answers_is_1_after_the_timeout() -> None:
    with socket.socket() as listener:  # accepts connections (the backlog), never speaks
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        target = f"127.0.0.1:{listener.getsockname()[1]}"
        run = probe("--target", target, "--timeout", "1")
    assert run.code == 1 and "DEADLINE_EXCEEDED" in run.err, run
    assert 1.0 <= run.seconds < 1.0 + QUICK_S, run


def test_bad_flags_are_1_and_name_the_flag(pki: Pki, tmp_path: Path) -> None:
    target = ("--target", f"127.0.0.1:{free_port()}")
    missing = str(tmp_path / "missing.pem")
    runs = {
        "--tls-ca": probe(*target, "--tls-ca", missing),
        "--tls-cert: needs --tls-key": probe(*target, "--tls-cert", str(pki.client_cert)),
        "--timeout: must be > 0": probe(*target, "--timeout", "0"),
        "--target '': expected HOST:PORT": probe("--target", ""),
        "--target 'localhost': expected HOST:PORT": probe("--target", "localhost"),
        "--target: must be in 1..65535": probe("--target", "127.0.0.1:99999"),
    }
    for needle, run in runs.items():
        assert refused(run, needle), (needle, run)


# ----- TLS only (no client certificates), and NOT_SERVING -----------------------------------


@pytest.fixture
def tls_only(pki: Pki) -> Iterator[tuple[str, health.HealthServicer]]:
    """A gRPC server with the health service and serve's TLS credentials (no client CA), its
    certificate naming only SERVICE_NAME, as a Kubernetes Service's would."""
    tls = load_tls(str(pki.service_cert), str(pki.service_key), None)
    servicer = health.HealthServicer()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_secure_port("127.0.0.1:0", server_credentials(ServerConfig(tls=tls)))
    grpc_server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        grpc_server.stop(None)


def test_tls_and_not_serving(tls_only: tuple[str, health.HealthServicer], pki: Pki) -> None:
    target, servicer = tls_only
    flags = ("--target", target, "--tls-ca", str(pki.ca), "--server-name", SERVICE_NAME)
    for status in ("SERVING", "NOT_SERVING", "UNKNOWN"):
        servicer.set("", health_pb2.HealthCheckResponse.ServingStatus.Value(status))
        run = probe(*flags)
        if status == "SERVING":
            assert (run.code, run.out, run.err) == (0, "SERVING\n", ""), run
        else:
            assert refused(run, status), (status, run)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    tls = TlsFiles(ca=pki.ca.read_bytes())
    assert check(target, tls=tls, server_name=SERVICE_NAME) == Answer(True, "SERVING")
    assert not check(target, tls=tls).serving  # 127.0.0.1 is not a name of the certificate
    runs = {
        "plaintext to a TLS port": probe("--target", target),
        "the name not given": probe("--target", target, "--tls-ca", str(pki.ca)),
        "the system CAs": probe("--target", target, "--tls", "--server-name", SERVICE_NAME),
    }
    for why, run in runs.items():
        assert refused(run, "UNAVAILABLE"), (why, run)


def test_the_environment_configures_it(
    tls_only: tuple[str, health.HealthServicer], pki: Pki
) -> None:
    """What the image's HEALTHCHECK (`minisgl health`, no flags) gets from `docker run -e`."""
    target, servicer = tls_only
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("minisgl.v1.ModelService", health_pb2.HealthCheckResponse.NOT_SERVING)
    env = {ENV["target"]: target, ENV["tls_ca"]: str(pki.ca), ENV["server_name"]: SERVICE_NAME}
    run = probe(env=env)
    assert (run.code, run.out) == (0, "SERVING\n"), run
    model = probe(env={**env, ENV["service"]: "minisgl.v1.ModelService"})
    assert refused(model, "minisgl.v1.ModelService: NOT_SERVING"), model
    flag_wins = probe("--target", f"127.0.0.1:{free_port()}", env=env)
    assert refused(flag_wins, "UNAVAILABLE"), flag_wins
    no_time = probe(env={**env, ENV["timeout"]: "0"})
    assert refused(no_time, "--timeout: must be > 0"), no_time
