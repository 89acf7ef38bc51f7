"""The online benchmark (W5's harness) end to end on the demo model: it starts its own server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minisgl.bench.online import RequestTrace, percentile

ROOT = Path(__file__).resolve().parents[2]


def test_percentile_and_itls() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    trace = RequestTrace(
        prompt_tokens=5, max_new_tokens=6, arrivals=[0.1, 0.3, 0.6], tokens=[1, 2, 3]
    )
    assert trace.ttft == 0.1
    assert trace.itls() == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.1])


@pytest.mark.slow
def test_poisson_run_against_a_launched_server(tmp_path: Path) -> None:
    out = tmp_path / "online.json"
    cmd = [
        sys.executable, "-m", "minisgl.bench.online", "--num-prompts", "12", "--rate", "30",
        "--input-len", "5,60", "--output-len", "3,15", "--json", str(out),
        "--max-model-len", "256",  # passed through to `minisgl serve`
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["model"] == "minisgl-demo" and r["server_flags"] == ["--max-model-len", "256"]
    assert r["completed"] == 12
    assert r["itl_samples"] == r["output_tokens"] - 12
    assert 3 * 12 <= r["output_tokens"] <= 15 * 12
    for key in ("ttft_ms", "itl_ms"):
        assert 0 < r[key]["median"] <= r[key]["p99"]
