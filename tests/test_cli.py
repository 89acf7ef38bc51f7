"""The `minisgl` command line, run as a real subprocess (demo model, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from minisgl.config import EngineConfig

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 120


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class Runs:
    """Start CLI subprocesses at once (they overlap their ~5 s of imports), collect later."""

    def __init__(self) -> None:
        self._procs: dict[str, subprocess.Popen[str]] = {}
        self._done: dict[str, Result] = {}

    def start(self, name: str, *args: str) -> None:
        env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
        self._procs[name] = subprocess.Popen(
            [sys.executable, "-m", "minisgl.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def __getitem__(self, name: str) -> Result:
        if name not in self._done:
            proc = self._procs[name]
            out, err = proc.communicate(timeout=TIMEOUT)
            self._done[name] = Result(proc.returncode, out, err)
        return self._done[name]

    def close(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.fixture(scope="module")
def runs() -> Iterator[Runs]:
    r = Runs()
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
    r.start("serve-bad-model", "serve", "--model", "/no/such/model", "--port", "0")
    r.start("serve-bad-tp", "serve", "--tp-size", "3", "--port", "0")
    r.start("presets", "presets")
    yield r
    r.close()


def test_generate_prints_prompt_and_summary(runs: Runs) -> None:
    res = runs["generate"]
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("Hello")
    assert "[5 tokens, length]" in res.stdout
    assert "Traceback" not in res.stderr


def test_generate_json_output_parses(runs: Runs) -> None:
    res = runs["json"]
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    assert [r["prompt"] for r in records] == ["Hello", "Once upon a time"]
    for r in records:
        assert isinstance(r["text"], str)
        assert len(r["token_ids"]) == 3 and all(isinstance(t, int) for t in r["token_ids"])
        assert r["finish_reason"] == "length"


def test_generate_help_mentions_every_engine_flag(runs: Runs) -> None:
    res = runs["help"]
    assert res.returncode == 0, res.stderr
    for f in fields(EngineConfig):
        flag = "--no-progress" if f.name == "progress" else "--" + f.name.replace("_", "-")
        assert flag in res.stdout, f"{flag} (EngineConfig.{f.name}) missing from --help"
    for flag in ("--max-new-tokens", "--temperature", "--top-p", "--top-k", "--json", "--stop"):
        assert flag in res.stdout


def test_bad_model_is_a_one_line_error(runs: Runs) -> None:
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
def test_serve_refuses_before_listening(runs: Runs, run: str, needle: str) -> None:
    res = runs[run]
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("minisgl: error:")]
    assert len(errors) == 1 and needle in errors[0], res.stderr
    assert "listening" not in res.stderr and "Traceback" not in res.stderr


def test_presets_lists_qwen3(runs: Runs) -> None:
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
