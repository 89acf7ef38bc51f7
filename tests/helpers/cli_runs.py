"""CLI subprocesses started together (their imports overlap), collected by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def records(self) -> list[dict[str, Any]]:
        """The JSON lines of a successful `--json` run."""
        assert self.returncode == 0, self.stderr
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]

    def error(self) -> str:
        """The one `minisgl: error:` line of a run that exited 2."""
        assert self.returncode == 2, (self.returncode, self.stderr)
        assert "Traceback" not in self.stderr, self.stderr
        errors = [ln for ln in self.stderr.splitlines() if ln.startswith("minisgl: error:")]
        assert len(errors) == 1, self.stderr
        return errors[0]


class CliRuns:
    """Start CLI subprocesses at once, collect each one's result when a test first asks for it.

    They run on the CPU, from the repo, without the interpreter tests' TRITON_INTERPRET, with
    `env` added to this process's environment and `extra_args` after each run's own.
    """

    def __init__(self, env: dict[str, str] | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        self.env.update(env or {})
        self.env.update(COLUMNS="200", CUDA_VISIBLE_DEVICES="")
        self.extra_args = extra_args
        self._procs: dict[str, subprocess.Popen[str]] = {}
        self._done: dict[str, CliResult] = {}

    def start(self, name: str, *args: str, pythonpath: Path | None = None) -> None:
        """Run `python -m minisgl.cli ARGS`; `pythonpath` goes first on PYTHONPATH (e.g. a
        sitecustomize.py that changes what imports)."""
        path = os.pathsep.join(str(p) for p in (pythonpath, ROOT) if p is not None)
        self._procs[name] = subprocess.Popen(
            [sys.executable, "-m", "minisgl.cli", *args, *self.extra_args],
            cwd=ROOT,
            env={**self.env, "PYTHONPATH": path},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def __getitem__(self, name: str) -> CliResult:
        if name not in self._done:
            proc = self._procs[name]
            out, err = proc.communicate(timeout=TIMEOUT)
            self._done[name] = CliResult(proc.returncode, out, err)
        return self._done[name]

    def close(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
