"""The offline benchmark harness on the CPU demo model: its JSON, and the post-mortem it logs
when a run fails (on a GPU a CUDA error surfaces a step or two after the batch that caused it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minisgl import LLM
from minisgl.attention.batch import ForwardBatch
from minisgl.bench.offline import WORKLOADS, make_requests, run_ours
from tests.helpers.server_util import REPO

pytestmark = pytest.mark.slow


def test_w2_on_three_prompts_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "w2.json"
    cmd = [sys.executable, "-m", "minisgl.bench.offline", "--workload", "W2"]
    subprocess.run(
        [*cmd, "--num-prompts", "3", "--no-progress", "--json", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    result = json.loads(out.read_text())
    ours = result["minisgl"]
    assert ours["output_tokens"] == 3 * 256  # W2: 256 new tokens each, ignore_eos
    assert ours["output_tok_s"] == pytest.approx(ours["output_tokens"] / ours["wall_s"])
    assert ours["steps"] == sum(p["steps"] for p in ours["phases"].values()) == 256
    assert result["workload"]["name"] == "W2" and result["device"] == "cpu"


def test_a_failed_run_logs_the_last_batches(caplog: pytest.LogCaptureFixture) -> None:
    llm = LLM(progress=False)
    forward = llm.runner.forward
    calls = 0

    def failing(batch: ForwardBatch) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 12:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return forward(batch)

    llm.runner.forward = failing  # type: ignore[method-assign]
    reqs = make_requests(WORKLOADS["W2"], llm.runner.model_config.vocab_size)[:2]
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run_ours(llm, [(p[:40], 20) for p, _ in reqs], temperature=0.0)
    lines = [
        m.strip() for r in caplog.records if (m := r.getMessage()).lstrip().startswith("forward ")
    ]
    # Counted from the timed run (the warm-up took 8 forwards): a prefill, two decodes, then
    # the one that failed.
    assert lines == [
        "forward 1: 2 requests (0 decoding, 80 prefill tokens), longest sequence 40, eager",
        "forward 2: 2 requests (2 decoding, 0 prefill tokens), longest sequence 41, eager",
        "forward 3: 2 requests (2 decoding, 0 prefill tokens), longest sequence 42, eager",
        "forward 4: 2 requests (2 decoding, 0 prefill tokens), longest sequence 43, eager",
    ]
