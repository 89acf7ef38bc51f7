"""The `minisgl` command line, run as a real subprocess (demo model, CPU)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest

from minisgl.cli import build_parser, engine_options
from minisgl.config import EngineConfig
from minisgl.models.source import DEMO_DIR
from minisgl.sampling_params import SamplingParams
from minisgl.server.config import ServerConfig
from tests.helpers.cli_runs import CliResult, CliRuns
from tests.helpers.server_util import free_port, run_server, wait_until

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120
NOT_OURS = "203.0.113.7"  # TEST-NET-3 (RFC 5737): never an address of this machine


#: Makes `import triton` fail as if it were not installed (a sitecustomize.py).
HIDE_TRITON = """
import sys


class _NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoTriton())
"""


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """ "" (the top level) and every subcommand -> its parser."""
    parser = build_parser()
    found: dict[str, argparse.ArgumentParser] = {"": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliRuns]:
    r = CliRuns()
    no_weights = tmp_path_factory.mktemp("no-weights")
    for f in DEMO_DIR.glob("*.json"):  # config and tokenizer, no *.safetensors
        shutil.copy(f, no_weights / f.name)
    hide_triton = tmp_path_factory.mktemp("hide-triton")
    (hide_triton / "sitecustomize.py").write_text(HIDE_TRITON)
    port = str(free_port())  # nothing listens there; the runs below refuse before listening
    r.start("serve-no-weights", "serve", "--model", str(no_weights), "--port", port)
    r.start("serve-bad-port", "serve", "--port", "99999")
    r.start("serve-metrics-on-grpc-port", "serve", "--port", port, "--metrics-port", port)
    r.start("gateway-bad-port", "gateway", "--port", "99999")
    r.start("serve-bad-host", "serve", "--host", NOT_OURS, "--port", port)
    r.start("serve-cuda", "serve", "--device", "cuda", "--port", port)
    r.start("serve-triton", "serve", "--attention-backend", "triton", "--port", port)
    r.start(
        "serve-fp8-flashinfer",
        *("serve", "--attention-backend", "flashinfer", "--kv-cache-dtype", "fp8_e4m3"),
        *("--port", port),
    )
    r.start(
        "serve-no-triton",
        "serve",
        "--attention-backend",
        "triton",
        "--port",
        port,
        pythonpath=hide_triton,
    )
    r.start("generate-cuda", "generate", "hi", "--device", "cuda", "--no-progress")
    r.start(
        "default-length",
        "generate",
        "Hello",
        "--ignore-eos",
        "--json",
        "--num-pages",
        "32",
        "--no-progress",
    )
    for name in subcommands():
        r.start(f"help-{name}", *([name] if name else []), "--help")
    r.start("generate", "generate", "Hello", "--max-new-tokens", "5", "--no-progress")
    r.start(
        "json",
        "generate",
        "Hello",
        "Once upon a time",
        "--max-new-tokens",
        "3",
        "--ignore-eos",
        "--json",
        "--num-pages",
        "16",
        "--no-progress",
    )
    r.start("bad-model", "generate", "Hello", "--model", "/no/such/model", "--no-progress")
    r.start("help", "generate", "--help")
    r.start("serve-bad-model", "serve", "--model", "/no/such/model", "--port", port)
    r.start("serve-bad-tp", "serve", "--tp-size", "3", "--port", port)
    r.start("presets", "presets")
    yield r
    r.close()


def test_generate_prints_prompt_and_summary(runs: CliRuns) -> None:
    res = runs["generate"]
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("Hello")
    assert "[5 tokens, length]" in res.stdout
    assert "Traceback" not in res.stderr


def test_generate_json_output_parses(runs: CliRuns) -> None:
    res = runs["json"]
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    assert [r["prompt"] for r in records] == ["Hello", "Once upon a time"]
    for r in records:
        assert isinstance(r["text"], str)
        assert len(r["token_ids"]) == 3 and all(isinstance(t, int) for t in r["token_ids"])
        assert r["finish_reason"] == "length"


def test_generate_help_mentions_every_engine_flag(runs: CliRuns) -> None:
    res = runs["help"]
    assert res.returncode == 0, res.stderr
    for f in fields(EngineConfig):
        flag = "--no-progress" if f.name == "progress" else "--" + f.name.replace("_", "-")
        assert flag in res.stdout, f"{flag} (EngineConfig.{f.name}) missing from --help"
    for flag in ("--max-new-tokens", "--temperature", "--top-p", "--top-k", "--json", "--stop"):
        assert flag in res.stdout


def test_engine_flags_come_from_the_engine_config_fields() -> None:
    """One source: each engine flag's default, choices and help text are its EngineConfig
    field's, the flags build the same EngineConfig as LLM(**options), and `check` refuses a value
    outside a field's choices as the flag does."""
    for command in ("generate", "chat", "serve"):
        parser = subcommands()[command]
        by_dest = {action.dest: action for action in parser._actions}
        for f in fields(EngineConfig):
            action = by_dest[f.name]
            assert action.default == f.default, f"{command} {action.option_strings}"
            assert action.help == f.metadata["help"], f"{command} {action.option_strings}"
            assert tuple(action.choices or ()) == f.metadata["choices"]
    gen = subcommands()["generate"]
    args = gen.parse_args(["hi"])
    assert EngineConfig.from_options(args.model, engine_options(args)) == EngineConfig()
    flags = ["hi", "--no-progress", "--tp-size", "2", "--mem-fraction", "0.5", "--num-pages", "8"]
    args = gen.parse_args([*flags, "--dtype", "float16", "--disable-radix-cache"])
    assert EngineConfig.from_options(None, engine_options(args)) == EngineConfig(
        progress=False,
        tp_size=2,
        mem_fraction=0.5,
        num_pages=8,
        dtype="float16",
        disable_radix_cache=True,
    )
    with pytest.raises(ValueError, match="attention_backend must be auto, torch, triton, "):
        EngineConfig.from_options(None, {"attention_backend": "cuda"})


def test_bad_model_is_a_one_line_error(runs: CliRuns) -> None:
    res = runs["bad-model"]
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("minisgl: error:")]
    assert len(errors) == 1
    assert "/no/such/model" in errors[0]
    assert res.stdout == ""


@pytest.mark.parametrize(
    ("run", "needle"),
    [
        ("serve-bad-model", "/no/such/model"),
        ("serve-bad-tp", "--tp-size: attention heads (4) is not divisible by the tensor-parallel"),
    ],
)
def test_serve_refuses_before_listening(runs: CliRuns, run: str, needle: str) -> None:
    res = runs[run]
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("minisgl: error:")]
    assert len(errors) == 1 and needle in errors[0], res.stderr
    assert "listening" not in res.stderr and "Traceback" not in res.stderr


def only_error_line(res: CliResult) -> str:
    """The one line a refused start prints (and nothing else: no traceback, no log)."""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


TRITON_MISSING = "--attention-backend triton needs triton, which is not importable here"
TRITON_ON_CPU = "--attention-backend triton needs a CUDA device, and the engine would run on cpu"


@pytest.mark.parametrize(
    ("run", "needle"),
    [
        ("serve-no-weights", "no *.safetensors files found"),
        ("serve-bad-port", "--port: must be in 1..65535, not 99999"),
        ("serve-metrics-on-grpc-port", "is the gRPC --port too"),
        ("gateway-bad-port", "--port: must be in 1..65535, not 99999"),
        ("serve-bad-host", f"--host {NOT_OURS}: not an address of this machine"),
        ("serve-cuda", "--device cuda: CUDA is not available here"),
        ("generate-cuda", "--device cuda: CUDA is not available here"),
        ("serve-no-triton", TRITON_MISSING),
        (
            "serve-fp8-flashinfer",
            "--kv-cache-dtype fp8_e4m3 is not supported by the flashinfer attention backend",
        ),
        (
            "serve-triton",
            TRITON_ON_CPU if importlib.util.find_spec("triton") is not None else TRITON_MISSING,
        ),
    ],
)
def test_startup_faults_are_one_line_and_exit_2(runs: CliRuns, run: str, needle: str) -> None:
    """What serve can check before it listens (weights, port, host, device, backend) ends the
    process with one line and code 2, never a traceback or a server that stays NOT_SERVING."""
    res = runs[run]
    line = only_error_line(res)
    assert line.startswith("minisgl: error: ") and needle in line, res.stderr
    assert res.returncode == 2
    assert res.stdout == ""


@pytest.mark.parametrize(
    ("name", "value", "flag"),
    [
        ("port", 0, "--port"),
        ("port", 65536, "--port"),
        ("host", "", "--host"),
        ("max_queued_requests", 0, "--max-queued-requests"),
        ("shutdown_grace_s", float("inf"), "--shutdown-grace"),
        ("exit_grace_s", -1.0, "--exit-grace"),
        ("max_message_bytes", 0, "--max-message-mib"),
        ("max_connection_age_s", 0.0, "--max-connection-age"),
    ],
)
def test_server_config_refuses_a_bad_value_naming_its_flag(
    name: str, value: object, flag: str
) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(flag)}: must be"):
        ServerConfig(**{name: value})  # type: ignore[arg-type]


def test_a_second_server_on_a_busy_port_refuses(tmp_path: Path) -> None:
    """gRPC listens with SO_REUSEPORT: without a check a second server would share the port."""
    with run_server(tmp_path, wait=False) as first:
        wait_until(
            lambda: first.proc.poll() is not None or first.health(timeout=2.0) != "no-connection",
            TIMEOUT,
            "the first server to listen",
        )
        assert first.proc.poll() is None, first.log()
        second = subprocess.run(
            [sys.executable, "-m", "minisgl.cli", "serve", "--port", str(first.port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        line = only_error_line(CliResult(second.returncode, second.stdout, second.stderr))
        assert line == f"minisgl: error: --port {first.port}: already in use on 127.0.0.1"
        assert second.returncode == 2
        assert first.proc.poll() is None and first.health() != "no-connection"


def option_entries(help_text: str) -> dict[str, str]:
    """Each option string -> its whole entry in argparse --help output, whitespace collapsed."""
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in help_text.splitlines():
        m = re.match(r"^  (-\S.*)$", line)
        if m:
            current = [m.group(1)]
            invocation = re.split(r"\s{2,}", m.group(1), maxsplit=1)[0]
            for option in re.findall(r"(?<![\w-])(--?\w[\w-]*)", invocation):
                entries[option] = current
        elif current is not None and line.startswith("   "):
            current.append(line)
        else:
            current = None
    return {option: " ".join(" ".join(lines).split()) for option, lines in entries.items()}


@pytest.mark.parametrize("command", list(subcommands()))
def test_help_shows_every_options_default(runs: CliRuns, command: str) -> None:
    """Every option of every subcommand (those added later too) says its default in --help:
    the value itself, or in words when it has none."""
    res = runs[f"help-{command}"]
    assert res.returncode == 0, res.stderr
    entries = option_entries(res.stdout)
    for action in subcommands()[command]._actions:
        if not action.option_strings or action.default is argparse.SUPPRESS:
            continue  # positionals, --help
        flag = action.option_strings[-1]
        entry = entries.get(flag)
        assert entry is not None, f"{flag} missing from `minisgl {command} --help`"
        assert "default" in entry.lower(), f"`minisgl {command} --help` {flag}: no default"
        if action.default is not None and not isinstance(action.default, bool):
            assert str(action.default) in entry, f"{flag}: {action.default} not in {entry!r}"


def test_generate_uses_the_api_default_max_new_tokens(runs: CliRuns) -> None:
    res = runs["default-length"]
    assert res.returncode == 0, res.stderr
    record = json.loads(res.stdout.splitlines()[0])
    assert len(record["token_ids"]) == SamplingParams().max_new_tokens
    assert record["finish_reason"] == "length"


def dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker reads it (Go filepath.Match plus `**`)."""
    out, i, p = "", 0, pattern.strip("/")
    while i < len(p):
        if p.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif p.startswith("**", i):
            out, i = out + ".*", i + 2
        elif p[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif p[i] == "?":
            out, i = out + "[^/]", i + 1
        elif p[i] == "[":
            end = p.index("]", i)
            out, i = out + p[i : end + 1], end + 1
        else:
            out, i = out + re.escape(p[i]), i + 1
    return re.compile(out)


def in_build_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker sends `path` (relative, with /) given .dockerignore `rules` (negated?,
    pattern): the last rule matching the path or one of its parent directories decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    kept = True
    for negated, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            kept = negated
    return kept


def test_dockerignore_keeps_what_the_image_copies_and_drops_the_rest() -> None:
    rules = [
        (line.startswith("!"), dockerignore_regex(line.removeprefix("!")))
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for junk in (
        ".git/config",
        ".venv/bin/python",
        "minisgl/__pycache__/cli.cpython-312.pyc",
        "tests/server/__pycache__/test_cli.cpython-312-pytest.pyc",
        ".pytest_cache/v/cache/lastfailed",
        ".mypy_cache/3.12/minisgl/cli.meta.json",
        ".ruff_cache/CACHEDIR.TAG",
        ".hypothesis/examples/x",
        ".cache/real-model/model.gguf",
        ".nginx/usr/sbin/nginx",
        "benchmarks/raw/w3.json",
        "minisgl.egg-info/PKG-INFO",
        "clients/node/node_modules/@grpc/grpc-js/package.json",
    ):
        assert not in_build_context(junk, rules), f"{junk} would be sent to the Docker daemon"
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    sources = [
        src for line in re.findall(r"^COPY (.+)$", dockerfile, re.M) for src in line.split()[:-1]
    ]
    assert sources, "no COPY in docker/Dockerfile"
    for src in sources:
        files = (
            [src]
            if (ROOT / src).is_file()
            else [
                f.relative_to(ROOT).as_posix()
                for f in (ROOT / src).rglob("*")
                if f.is_file() and "__pycache__" not in f.parts
            ]
        )
        assert files, src
        for f in files:
            assert in_build_context(f, rules), f"{f} (COPY {src}) is excluded by .dockerignore"


def test_presets_lists_qwen3(runs: CliRuns) -> None:
    res = runs["presets"]
    assert res.returncode == 0, res.stderr
    names = res.stdout.split()
    assert "qwen3-0.6b" in names and "llama-3.1-8b" in names


def test_unknown_subcommand_is_a_usage_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "minisgl.cli", "frobnicate"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


# ----- a model whose output has no text ------------------------------------------------------

#: A config without a tokenizer whose vocabulary is twice the demo tokenizer's: what every
#: preset is (`--model qwen3-0.6b --dummy-weights`), small enough to load in a moment.
BIG_VOCAB_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "vocab_size": 4096,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 128,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "eos_token_id": 2,
}
NO_TEXT_FLAGS = ("--dummy-weights", "--max-new-tokens", "3", "--ignore-eos", "--num-pages", "16")


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("no-text") / "big-vocab.json"
    path.write_text(json.dumps(BIG_VOCAB_CONFIG))
    return path


@pytest.fixture(scope="module")
def no_text(big_vocab: Path) -> Iterator[dict[str, CliResult]]:
    """`generate` (plain and --json) and `chat` (two messages on stdin) for big_vocab."""
    model = ("--model", str(big_vocab), *NO_TEXT_FLAGS, "--no-progress")
    commands = {
        "generate": ["generate", "Hello", *model],
        "json": ["generate", "Hello", "--json", *model],
        "chat": ["chat", *model, "--temperature", "0"],
    }
    inputs = {"chat": "hi\nagain\n/exit\n"}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "minisgl.cli", *args],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in commands.items()
    }
    results: dict[str, CliResult] = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(inputs.get(name, ""), timeout=TIMEOUT)
            results[name] = CliResult(proc.returncode, out, err)
        yield results
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def _token_ids(line: str) -> list[int]:
    match = re.search(r"token ids: ([\d ]+)", line)
    assert match, line
    return [int(t) for t in match[1].split()]


def test_generate_without_text_says_so_and_shows_the_ids(no_text: dict[str, CliResult]) -> None:
    res, as_json = no_text["generate"], no_text["json"]
    assert res.returncode == 0 and as_json.returncode == 0, res.stderr + as_json.stderr
    record = json.loads(as_json.stdout)
    assert record["text"] is None and len(record["token_ids"]) == 3
    assert "big-vocab has no tokenizer of its own" in record["text_unavailable"]
    lines = res.stdout.splitlines()
    assert lines[0] == "Hello"  # the prompt, with no (empty) answer glued to it
    assert lines[1].startswith("  [text unavailable: big-vocab has no tokenizer of its own")
    assert _token_ids(lines[2]) == record["token_ids"]
    assert lines[3] == "  [3 tokens, length]"


def test_chat_without_text_shows_each_replys_ids(no_text: dict[str, CliResult]) -> None:
    res = no_text["chat"]
    assert res.returncode == 0, res.stderr
    assert "Text is unavailable: big-vocab has no tokenizer of its own" in res.stdout
    replies = [ln for ln in res.stdout.split(">>> ") if ln.startswith("[text unavailable]")]
    assert len(replies) == 2, res.stdout
    for reply in replies:
        assert len(_token_ids(reply)) == 3 and "[3 tokens, length]" in reply


def test_offline_api_without_text_has_ids_and_refuses_text_features(big_vocab: Path) -> None:
    from minisgl import LLM

    llm = LLM(str(big_vocab), dummy_weights=True, num_pages=16, progress=False)
    assert (
        llm.text_unavailable is not None and "knows only 2048 of its 4096" in llm.text_unavailable
    )
    params = SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True)
    out = llm.generate("Hello", params)[0]
    assert out.text is None and len(out.token_ids) == 3
    with pytest.raises(ValueError, match=r"^stream: text is unavailable"):
        next(llm.stream("Hello", params))
    with pytest.raises(ValueError, match=r"^stop: stop strings need the output as text"):
        llm.generate("Hello", SamplingParams(stop=["x"]))
    assert not llm.has_unfinished()
