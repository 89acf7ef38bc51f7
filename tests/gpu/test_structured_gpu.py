"""Structured output on CUDA: the bitmask through the fused sampling kernels and overlap
scheduling (on by default on CUDA), valid outputs, unconstrained rows unchanged, and the launch
path free of host-device synchronisation with constrained rows in the batch."""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema
import pytest
import torch

from minisgl import LLM, SamplingParams
from tests.helpers.schemas import random_object

pytestmark = pytest.mark.gpu


def _sampling(i: int) -> dict[str, Any]:
    return [
        {"temperature": 0.0},
        {"temperature": 1.0, "seed": i},
        {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "min_p": 0.05, "seed": i},
        {"temperature": 1.0, "repetition_penalty": 1.3, "frequency_penalty": 0.5, "seed": i},
    ][i % 4]


@pytest.mark.parametrize("overlap", ["on", "off"])
def test_json_schemas_on_cuda(overlap: str) -> None:
    llm = LLM(progress=False, device="cuda", overlap_schedule=overlap)
    rng = random.Random(3)
    schemas = [random_object(rng) for _ in range(64)]
    params = [
        SamplingParams(max_new_tokens=160, json_schema=json.dumps(s), **_sampling(i))
        for i, s in enumerate(schemas)
    ]
    plain = SamplingParams(temperature=0.0, max_new_tokens=32, ignore_eos=True)
    prompts = ["Give me JSON:", "hello", "x y z", "The answer is"]
    alone = llm.generate(prompts, plain)
    outs = llm.generate(prompts * 16 + prompts, params + [plain] * 4)
    assert [o.token_ids for o in outs[-4:]] == [o.token_ids for o in alone]
    stopped = 0
    for out, schema in zip(outs, schemas, strict=False):
        assert out.finish_reason in ("stop", "length")
        if out.finish_reason == "stop":
            stopped += 1
            assert out.text is not None
            jsonschema.validate(json.loads(out.text), schema)
    assert stopped >= 48


def test_constrained_launch_path_does_not_synchronise() -> None:
    llm = LLM(progress=False, device="cuda", overlap_schedule="on")
    schema = json.dumps(random_object(random.Random(5)))
    for i in range(8):
        llm.submit("hello", SamplingParams(max_new_tokens=40, json_schema=schema, **_sampling(i)))
        llm.submit("hello", SamplingParams(max_new_tokens=40, **_sampling(i)))
    for _ in range(3):  # past the first steps (compilation, graph capture)
        llm.step()
    sched = llm.scheduler
    launch = sched._launch

    def guarded() -> Any:
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    sched._launch = guarded  # type: ignore[method-assign]
    while llm.has_unfinished():
        llm.step()
