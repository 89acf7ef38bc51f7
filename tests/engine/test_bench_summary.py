"""`python -m minisgl.bench.summary` on a result file of a real offline-benchmark run (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from minisgl import LLM
from minisgl.bench.offline import Workload, make_requests, run_ours
from tests.helpers.server_util import REPO


def test_prints_the_headline_and_the_phases_of_a_real_run(tmp_path: Path) -> None:
    w = Workload("W2", num_prompts=4, input_len=(8, 8), output_len=(6, 6), temperature=0.0)
    ours = run_ours(LLM(num_pages=64, progress=False), make_requests(w, vocab=100), 0.0)
    out = tmp_path / "w2.json"
    # The keys that minisgl.bench.offline writes (see its main), for a CPU run.
    result = {"workload": asdict(w), "model": None, "device": "cpu", "minisgl": ours}
    out.write_text(json.dumps({**result, "copy_bandwidth_gb_s": float("nan")}))
    shown = subprocess.run(
        [sys.executable, "-m", "minisgl.bench.summary", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.splitlines()
    assert shown[0] == (
        f"{out}: cpu None W2 {ours['output_tok_s']:.0f} tok/s, wall {ours['wall_s']:.2f} s, "
        f"steps {ours['steps']}, copy nan GB/s"
    )  # no roofline (W4 only) and no HF figures (--hf-baseline)
    phase = ours["phases"]["running<16"]
    assert ours["steps"] == phase["steps"] == 6
    assert (
        shown[1] == f"    running<16: 6 steps, {phase['wall_s']} s, {phase['ms_per_step']} ms/step"
    )
    assert shown[2].startswith("    slowest steps (ms, running): [")
    assert len(shown) == 3
