"""Overlap scheduling on CUDA: planning and launching a step never waits for the GPU.

torch's sync debug mode turns every implicit host-device synchronisation (a copy from
pageable memory, .item(), .tolist() of a device tensor, nonzero, ...) into an error; the whole
launch path of every step runs under it, with sampling options that exercise each branch.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from minisgl import LLM, SamplingParams
from minisgl.llm import RequestOutput

pytestmark = pytest.mark.gpu


def _params(i: int) -> SamplingParams:
    kinds: list[dict[str, Any]] = [
        {"temperature": 0.0},
        {"temperature": 0.8, "seed": i},
        {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.05, "seed": i},
        {"temperature": 0.0, "repetition_penalty": 1.3, "frequency_penalty": 0.5},
        {"temperature": 0.0, "min_new_tokens": 10, "logprobs": True, "top_logprobs": 3},
    ]
    return SamplingParams(max_new_tokens=24 + i % 7, ignore_eos=i % 2 == 0, **kinds[i % 5])


def _run(llm: LLM, guard: bool) -> list[RequestOutput]:
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 2000) for _ in range(rng.randrange(1, 200))] for _ in range(20)]
    sched = llm.scheduler
    launch = sched._launch
    launches = 0

    def guarded() -> Any:
        nonlocal launches
        launches += 1
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    if guard:
        sched._launch = guarded  # type: ignore[method-assign]
    rids = []
    done: dict[str, RequestOutput] = {}
    for step in range(2000):
        if step < 20:  # one arrival per step: prefills mixed with decodes, graph and eager
            rids.append(llm.submit(prompts[step], _params(step)))
        elif not llm.has_unfinished():
            break
        for out in llm.step():
            done[out.rid] = out
    assert not guard or launches > 40
    sched.check_invariants()
    return [done[r] for r in rids]


def test_launching_a_step_never_synchronizes(checkpoints: dict[str, Path]) -> None:
    assert torch.cuda.is_available(), "the gpu tests need a CUDA GPU"
    opts: dict[str, Any] = {"device": "cuda", "dtype": "float32", "num_pages": 1024}
    llm = LLM(str(checkpoints["llama"]), progress=False, overlap_schedule="on", **opts)
    assert llm.scheduler.overlap and llm.runner.graphs is not None
    got = _run(llm, guard=True)
    sync = LLM(str(checkpoints["llama"]), progress=False, overlap_schedule="off", **opts)
    want = _run(sync, guard=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]


@pytest.mark.parametrize("page_size", [1, 16])
def test_overlap_matches_sync_under_memory_pressure(
    checkpoints: dict[str, Path], page_size: int
) -> None:
    """W3-like lengths (prompts and outputs from 1 token) in a pool that forces queueing and
    retraction: overlap scheduling with graphs gives exactly the synchronous tokens."""
    rng = random.Random(2)
    reqs = [
        ([rng.randrange(3, 2000) for _ in range(rng.randint(1, 300))], rng.randint(1, 150))
        for _ in range(150)
    ]
    prompts = [p for p, _ in reqs]
    params = [SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True) for _, n in reqs]
    results = {}
    for mode in ("off", "on"):
        llm = LLM(
            str(checkpoints["llama"]),
            device="cuda",
            dtype="float32",
            progress=False,
            overlap_schedule=mode,
            page_size=page_size,
            num_pages=640 // page_size,
            max_running_requests=32,
            chunked_prefill_size=256,
        )
        outs = llm.generate(prompts, params)
        torch.cuda.synchronize()
        assert llm.scheduler.stats().retractions > 0
        llm.scheduler.check_invariants()
        results[mode] = [o.token_ids for o in outs]
    assert [len(t) for t in results["on"]] == [n for _, n in reqs]
    assert results["on"] == results["off"]
