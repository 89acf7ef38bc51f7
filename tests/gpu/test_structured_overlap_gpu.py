"""Structured output under overlap scheduling on CUDA: both halves of a step (the forward, then
the sampling with the bitmask filled from the advanced matchers) launch without a host-device
synchronisation, constrained requests decode on every step, and greedy outputs are the same
with overlap on and off (the batches are the same, so are the kernels)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import torch

from minisgl import LLM, SamplingParams
from tests.helpers.schemas import random_object, ten_field_schema

pytestmark = pytest.mark.gpu

PROMPTS = ["Give me JSON:", "hello", "x y z", "The answer is"]


def test_both_halves_of_a_constrained_step_launch_without_synchronising() -> None:
    llm = LLM(progress=False, device="cuda", overlap_schedule="on")
    schema = json.dumps(random_object(random.Random(5)))
    for i in range(8):
        temperature = 0.0 if i % 2 else 0.9
        llm.submit("hello", SamplingParams(max_new_tokens=40, json_schema=schema, seed=i))
        llm.submit("hello", SamplingParams(max_new_tokens=40, temperature=temperature, seed=i))
    for _ in range(3):  # past the first steps (compilation, graph capture)
        llm.step()
    sched = llm.scheduler
    launch, launch_sample = sched._launch, sched._launch_sample
    guarded_calls = [0, 0]

    def guard(fn: Any, slot: int) -> Any:
        def guarded(*args: Any) -> Any:
            guarded_calls[slot] += 1
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        return guarded

    sched._launch = guard(launch, 0)  # type: ignore[method-assign]
    sched._launch_sample = guard(launch_sample, 1)  # type: ignore[method-assign]
    while llm.has_unfinished():
        llm.step()
    assert guarded_calls[0] > 10 and guarded_calls[1] > 10


def test_constrained_requests_decode_every_step_with_the_tokens_of_the_sync_run() -> None:
    n = 48
    schema = json.dumps(ten_field_schema())
    params = [
        SamplingParams(temperature=0.0, max_new_tokens=n, json_schema=schema) for _ in range(16)
    ]
    results = {}
    for mode in ("off", "on"):
        llm = LLM(progress=False, device="cuda", overlap_schedule=mode)
        llm.generate(PROMPTS, params[:4])  # warm-up: compile and capture
        rids = [llm.submit(PROMPTS[i % 4] + " " * (i // 4), p) for i, p in enumerate(params)]
        done: dict[str, Any] = {}
        steps = 0
        while llm.has_unfinished() and steps < 4 * n:
            done.update((out.rid, out) for out in llm.step())
            steps += 1
        outs = [done[rid] for rid in rids]
        longest = max(len(o.token_ids) for o in outs)
        assert steps <= longest + 2, f"{mode}: {steps} steps for {longest} tokens"
        for out in outs:
            assert out.finish_reason in ("stop", "length")
            if out.finish_reason == "stop":
                assert set(json.loads(out.text or "")) == {f"field_{i}" for i in range(10)}
        results[mode] = [(o.token_ids, o.finish_reason) for o in outs]
        llm.close()
    assert results["on"] == results["off"]
