"""`minisgl health`: ask a server's grpc.health.v1 service whether it is SERVING.

For container health checks (docker/Dockerfile's HEALTHCHECK) and Kubernetes exec probes
(docker/k8s/minisgl.yaml): exit code 0 when the answer is SERVING, 1 for anything else
(NOT_SERVING while warming up or draining, an unknown service, nothing listening, a failed TLS
handshake, no answer within the timeout, a TLS file that cannot be read). Health needs no API
key, so it takes none. It speaks plaintext, TLS (`--tls-ca`, or `--tls` for the system CAs)
or mTLS (`--tls-cert` / `--tls-key` as well, a client certificate that the server's
`--tls-client-ca` signed). Every flag can also come from an environment variable (ENV), so
that an image's fixed HEALTHCHECK command follows how the container was started.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from minisgl.server.config import check_port
from minisgl.server.security import TlsFiles, load_tls

ENV = {
    "target": "MINISGL_HEALTH_TARGET",
    "service": "MINISGL_HEALTH_SERVICE",
    "tls": "MINISGL_HEALTH_TLS",
    "tls_ca": "MINISGL_HEALTH_TLS_CA",
    "tls_cert": "MINISGL_HEALTH_TLS_CERT",
    "tls_key": "MINISGL_HEALTH_TLS_KEY",
    "server_name": "MINISGL_HEALTH_SERVER_NAME",
    "timeout": "MINISGL_HEALTH_TIMEOUT",
}
"""The environment variable that gives each flag's default (by argparse dest)."""
DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 3.0
TLS_FLAGS = ("--tls-cert", "--tls-key", "--tls-ca")


@dataclass(frozen=True)
class Answer:
    """What the check found: whether the server is SERVING, and a one-line description."""

    serving: bool
    detail: str


def check(
    target: str,
    service: str = "",
    tls: TlsFiles | None = None,
    server_name: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Answer:
    """One grpc.health.v1 Check of `service` ("": the whole server) on `target`, over TLS
    when `tls` is given (its `ca`: the CA of the server's certificate, None for the system
    CAs; its `cert` and `key`: a client certificate for mTLS). `server_name` is the name the
    server's certificate must carry when it is not the target's host."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    options: list[tuple[str, str | int]] = [("grpc.enable_retries", 0)]
    if tls is None:
        channel = grpc.insecure_channel(target, options)
    else:
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        creds = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
        channel = grpc.secure_channel(target, creds, options)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as e:
            code = e.code()
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            return Answer(False, f"{name} ({e.details()})")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return Answer(reply.status == health_pb2.HealthCheckResponse.SERVING, str(status))


def add_health_args(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """The flags of `minisgl health`; each one's default comes from its ENV variable in
    `env` when that is set."""

    def default(dest: str, fallback: str | None = None) -> str | None:
        return env.get(ENV[dest]) or fallback

    def named(dest: str) -> str:
        return f"(env {ENV[dest]})"

    parser.add_argument(
        "--target",
        default=default("target", DEFAULT_TARGET),
        help=f"the server, host:port {named('target')}",
    )
    parser.add_argument(
        "--service",
        default=default("service", ""),
        help="the service to ask about, e.g. minisgl.v1.GenerationService (default: the whole "
        f"server) {named('service')}",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=default("timeout", str(DEFAULT_TIMEOUT_S)),  # a string: argparse converts it
        help=f"seconds to wait for the answer {named('timeout')}",
    )
    g = parser.add_argument_group("TLS, for a server with --tls-cert (health needs no API key)")
    g.add_argument(
        "--tls",
        action="store_true",
        default=(env.get(ENV["tls"]) or "0").lower() in ("1", "true", "yes", "on"),
        help=f"connect over TLS, trusting the system CAs (env {ENV['tls']}=1)",
    )
    g.add_argument(
        "--tls-ca",
        metavar="PEM",
        default=default("tls_ca"),
        help=f"CA of the server's certificate (implies --tls) {named('tls_ca')}",
    )
    g.add_argument(
        "--tls-cert",
        metavar="PEM",
        default=default("tls_cert"),
        help="client certificate, for a server with --tls-client-ca (mTLS; implies --tls) "
        f"{named('tls_cert')}",
    )
    g.add_argument(
        "--tls-key",
        metavar="PEM",
        default=default("tls_key"),
        help=f"private key of --tls-cert {named('tls_key')}",
    )
    g.add_argument(
        "--server-name",
        default=default("server_name"),
        help="the name the server's certificate carries, when the target's host is not one of "
        f"its names (e.g. a probe of 127.0.0.1) {named('server_name')}",
    )


def check_target(target: str) -> None:
    """Raise ValueError unless `target` is HOST:PORT (an IPv6 host in brackets)."""
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--target {target!r}: expected HOST:PORT, e.g. {DEFAULT_TARGET}")
    check_port(int(port), "--target")


def run(args: argparse.Namespace) -> int:
    """`minisgl health`: 0 and SERVING on stdout when serving, else 1 and why on stderr."""
    prefix = f"minisgl health: {args.target}"
    if "grpc" not in sys.modules:  # a probe's output is its one line, not gRPC's handshake logs
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        check_target(args.target)
        if args.timeout <= 0:
            raise ValueError(f"--timeout: must be > 0, not {args.timeout}")
        tls = load_tls(args.tls_cert, args.tls_key, args.tls_ca, TLS_FLAGS, False)
    except ValueError as e:
        print(f"{prefix}: {e}", file=sys.stderr)
        return 1
    if tls is None and args.tls:
        tls = TlsFiles()
    answer = check(args.target, args.service, tls, args.server_name, args.timeout)
    if answer.serving:
        print(answer.detail)
        return 0
    service = f" {args.service}" if args.service else ""
    print(f"{prefix}{service}: {answer.detail}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minisgl.server.health_check")
    add_health_args(parser, os.environ)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
