"""The deployment files agree with the code: docker/Dockerfile's entrypoint and HEALTHCHECK,
docker/compose.yaml's replicas, and docker/k8s/minisgl.yaml as written (plaintext, native gRPC
probes) and with its TLS lines turned on (exec probes running `minisgl health`): every flag is
a real flag of `minisgl serve` or `minisgl health`, and the ports agree between the flags,
the containers, the probes, the Service and the Prometheus annotations."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from minisgl import cli
from minisgl.server.config import ServerConfig

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
K8S = DOCKER / "k8s" / "minisgl.yaml"


def subcommand(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise AssertionError("no subcommands")


def parse(argv: list[str], command: str) -> argparse.Namespace:
    """`argv` (starting with `minisgl COMMAND`) parsed by the CLI; every --flag in it must be
    one of that command's own flags, spelled out (argparse would accept abbreviations)."""
    assert argv[:2] == ["minisgl", command], argv
    known = {s for a in subcommand(command)._actions for s in a.option_strings}
    flags = [a.split("=", 1)[0] for a in argv[2:] if a.startswith("--")]
    assert set(flags) <= known, f"not flags of `minisgl {command}`: {set(flags) - known}"
    args = cli.build_parser().parse_args(argv[1:])
    assert args.command == command
    return args


def dockerfile_instruction(name: str) -> str:
    """The text of the Dockerfile's (last) `name` instruction, continuation lines joined."""
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    found = re.findall(rf"^{name}\s+(.+)$", text, re.M)
    assert found, f"no {name} in docker/Dockerfile"
    return str(found[-1])


def entrypoint() -> list[str]:
    argv: list[str] = json.loads(dockerfile_instruction("ENTRYPOINT"))
    return argv


def image_port() -> int:
    return int(parse(entrypoint(), "serve").port)


def test_the_entrypoint_is_the_minisgl_command() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^\[project\.scripts\]\nminisgl = "minisgl\.cli:main"$', pyproject, re.M)
    args = parse(entrypoint(), "serve")
    assert args.host == "0.0.0.0"
    exposed = dockerfile_instruction("EXPOSE").split()
    assert str(args.port) in exposed and "9400" in exposed


def test_the_image_healthcheck_is_the_health_command() -> None:
    line = dockerfile_instruction("HEALTHCHECK")
    options, _, command = line.partition(" CMD ")
    args = parse(json.loads(command), "health")
    assert args.func is cli._health
    assert args.target == f"127.0.0.1:{image_port()}"  # the default: what the entrypoint serves
    timeout = re.search(r"--timeout=(\d+)s", options)
    assert timeout is not None and args.timeout < int(timeout.group(1))


def test_compose_replicas_use_the_image_healthcheck() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    replicas = {k: v for k, v in compose["services"].items() if k.startswith("minisgl-")}
    assert replicas
    for name, service in replicas.items():
        parse(entrypoint() + service["command"], "serve")
        check = service.get("healthcheck")
        if check is not None:  # an override must be the health command too
            assert check["test"][0] == "CMD", name
            parse(check["test"][1:], "health")
    waits = compose["services"]["lb"]["depends_on"]
    assert {waits[name]["condition"] for name in replicas} == {"service_healthy"}


def k8s_variant(tls: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Deployment and the Service, as written or with the TLS lines turned on the way the
    file's comment says (`#tls ` prefixes removed, lines ending in `# plaintext` deleted)."""
    text = K8S.read_text()
    if tls:
        lines = re.sub(r"(?m)^( *)#tls ", r"\1", text).splitlines()
        text = "\n".join(line for line in lines if not line.endswith("# plaintext"))
    docs = {d["kind"]: d for d in yaml.safe_load_all(text)}
    assert set(docs) == {"Deployment", "Service"}
    return docs["Deployment"], docs["Service"]


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_k8s_example_agrees_with_the_code(tls: bool) -> None:
    deployment, service = k8s_variant(tls)
    pod = deployment["spec"]["template"]
    assert (
        deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    )
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    args = parse(entrypoint() + container["args"], "serve")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": args.port, "metrics": args.metrics_port}
    # Prometheus: the pod's and the Service's annotations name the metrics port.
    for annotated in (pod["metadata"], service["metadata"]):
        notes = annotated["annotations"]
        assert notes["prometheus.io/scrape"] == "true"
        assert notes["prometheus.io/port"] == str(args.metrics_port)
        assert notes["prometheus.io/path"] == "/metrics"
    by_target = {p["targetPort"]: p["port"] for p in service["spec"]["ports"]}
    assert set(by_target) == set(ports) and by_target["metrics"] == args.metrics_port
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > ServerConfig().shutdown_grace_s == args.shutdown_grace
    # Probes: native gRPC on the served port in plaintext; `minisgl health` over TLS.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert set(mounts) <= set(volumes)
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        if not tls:
            assert set(probe) & {"grpc", "exec"} == {"grpc"}, kind
            assert probe["grpc"]["port"] == args.port, kind
            continue
        assert set(probe) & {"grpc", "exec"} == {"exec"}, kind
        health = parse(probe["exec"]["command"], "health")
        assert health.target == f"127.0.0.1:{args.port}", kind
        assert health.timeout < probe["timeoutSeconds"], kind
        assert health.tls_ca is not None and health.tls_ca.startswith(mounts["tls"] + "/")
        assert health.server_name, f"{kind}: the certificate does not name 127.0.0.1"
    if tls:
        assert args.tls_cert.startswith(mounts["tls"] + "/")
        assert args.tls_key.startswith(mounts["tls"] + "/")
        assert volumes["tls"]["secret"]["secretName"]
    else:
        assert args.tls_cert is None and "tls" not in mounts and "tls" not in volumes
