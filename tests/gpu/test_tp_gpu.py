"""Tensor parallelism on GPUs (NCCL): two ranks must compute what one does.

Needs two GPUs; fails on a machine without CUDA and
skips, saying so, on one with a single GPU. Float32 so the comparison is exact up to the order
of the ranks' partial sums: greedy tokens equal, logprobs within 1e-4, with overlap scheduling
on. The ranks decode without CUDA graphs (see minisgl.engine.cuda_graph.use_decode_graphs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from minisgl import LLM, SamplingParams

pytestmark = pytest.mark.gpu

PROMPTS: list[Any] = [[5, 17, 300, 42, 9], [7] * 23, list(range(100, 400)), [1999, 3]]


def _run(path: Path, **options: Any) -> list[Any]:
    params = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True, logprobs=True)
    with LLM(str(path), device="cuda", dtype="float32", progress=False, **options) as llm:
        outs = llm.generate(PROMPTS, params)
        outs += llm.generate(PROMPTS, params)  # again: radix cache hits
        llm.scheduler.check_invariants()
    return outs


def test_two_gpus_compute_what_one_does(checkpoints: dict[str, Path]) -> None:
    assert torch.cuda.is_available(), "the gpu tests need a CUDA GPU"
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    one = _run(checkpoints["qwen3-qknorm"], num_pages=1024)
    two = _run(checkpoints["qwen3-qknorm"], tp_size=2, num_pages=1024)
    for a, b in zip(one, two, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
