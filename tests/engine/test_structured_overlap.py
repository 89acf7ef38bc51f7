"""Structured output under overlap scheduling (the demo model on the CPU, with overlap forced on,
and off for comparison): a step's forward is launched before the step in flight is read back,
and its bitmask is filled from the advanced matchers just before its sampling, so constrained
requests decode on consecutive steps with the same tokens as without overlap. Requests that
finish, are aborted or are retracted while a step of theirs is in flight leave nothing behind."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from minisgl import LLM, SamplingParams
from minisgl.ipc.messages import TokenOut
from minisgl.scheduler.scheduler import Scheduler
from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.engine_util import assert_idle

PROMPTS = ["Give me JSON:", "hello", "The answer is", "x y z"]
SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "n": {"type": "integer", "minimum": 0, "maximum": 999},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "n", "ok"],
    }
)


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[str, LLM]]:
    llms = {
        mode: LLM(progress=False, num_pages=512, overlap_schedule=mode) for mode in ("off", "on")
    }
    yield llms
    for llm in llms.values():
        llm.close()


def _record_samplings(sched: Scheduler) -> list[tuple[list[str], torch.Tensor | None]]:
    """(request ids of the rows, bitmask) of every sampling the scheduler launches from now."""
    seen: list[tuple[list[str], torch.Tensor | None]] = []
    rows: list[list[str]] = []
    launch_sample, runner_sample = sched._launch_sample, sched.runner.launch_sample

    def scheduler_side(fwd: Any) -> Any:
        rows.append([r.rid for r, _ in fwd.plan])
        return launch_sample(fwd)

    def runner_side(pending: Any, bitmask: torch.Tensor | None) -> Any:
        seen.append((rows[-1], bitmask))
        return runner_sample(pending, bitmask)

    sched._launch_sample = scheduler_side  # type: ignore[method-assign]
    sched.runner.launch_sample = runner_side  # type: ignore[method-assign]
    return seen


def _restore(sched: Scheduler) -> None:
    """Undo `_record_samplings` (and any other per-instance override of these methods)."""
    for obj, name in (
        (sched, "_launch_sample"),
        (sched, "_complete"),
        (sched.runner, "launch_sample"),
    ):
        if name in vars(obj):
            delattr(obj, name)


def _drain(sched: Scheduler, limit: int = 2000) -> dict[str, list[TokenOut]]:
    """Step until idle, checking the invariants after every step; TokenOuts per request."""
    outs: dict[str, list[TokenOut]] = {}
    for _ in range(limit):
        if not sched.has_work():
            return outs
        for ev in sched.step():
            outs.setdefault(ev.rid, []).append(ev)
        sched.check_invariants()
    raise AssertionError(f"not idle after {limit} steps")


def test_greedy_constrained_outputs_are_the_same_with_and_without_overlap(
    engines: dict[str, LLM],
) -> None:
    params = [
        SamplingParams(temperature=0.0, max_new_tokens=60, json_schema=SCHEMA),
        SamplingParams(temperature=0.0, max_new_tokens=40, regex=r"[a-z]{3,9}@(foo|bar)\.com"),
        SamplingParams(temperature=0.0, max_new_tokens=60, json_object=True),
        SamplingParams(temperature=0.0, max_new_tokens=10, choice=["alpha", "beta", "gamma"]),
        # Seeded sampling is the same too (its noise depends on seed and step only).
        SamplingParams(temperature=1.0, seed=5, max_new_tokens=60, json_schema=SCHEMA),
        SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True),
    ]
    prompts = [PROMPTS[i % 4] for i in range(len(params))]
    results = {}
    for mode, llm in engines.items():
        outs = llm.generate(prompts, params)
        results[mode] = [(o.token_ids, o.finish_reason) for o in outs]
        for out, p in zip(outs, params, strict=True):
            if out.finish_reason == "stop" and p.json_schema is not None:
                assert set(json.loads(out.text or "")) == {"name", "n", "ok"}
        assert outs[3].finish_reason == "stop" and outs[3].text in ("alpha", "beta", "gamma")
        assert_idle(llm)
    assert results["on"] == results["off"]
    assert sum(reason == "stop" for _, reason in results["on"]) >= 3


@pytest.mark.parametrize("mode", ["off", "on"])
def test_constrained_requests_decode_on_consecutive_steps(
    engines: dict[str, LLM], mode: str
) -> None:
    """n new tokens take about n steps, constrained or not: one prefill, then one decode a
    step (with overlap one more step reads the last token back)."""
    llm, n = engines[mode], 24
    params = [
        SamplingParams(temperature=0.0, max_new_tokens=n, regex="[ab]{200}"),
        SamplingParams(temperature=0.7, seed=1, max_new_tokens=n, regex="[0-9]{200}"),
        SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True),
    ]
    rids = [llm.submit(prompt, p) for prompt, p in zip(PROMPTS, params, strict=False)]
    done: dict[str, Any] = {}
    steps = 0
    while llm.has_unfinished() and steps < 4 * n:
        done.update((out.rid, out) for out in llm.step())
        steps += 1
    outs = [done[rid] for rid in rids]
    assert all(len(o.token_ids) == n and o.finish_reason == "length" for o in outs)
    assert re.fullmatch("[ab]+", outs[0].text or "") and re.fullmatch("[0-9]+", outs[1].text or "")
    assert steps <= n + 1, f"{steps} steps for {n} tokens"
    assert_idle(llm)


def test_unconstrained_rows_of_a_mixed_overlapped_batch_are_unchanged(
    engines: dict[str, LLM],
) -> None:
    llm = engines["on"]
    plain = [
        SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, seed=4, max_new_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1.0, repetition_penalty=1.2, seed=6, max_new_tokens=20),
    ]
    alone = llm.generate(PROMPTS[:3], plain)
    constrained = [
        SamplingParams(temperature=0.0, max_new_tokens=20, json_schema=SCHEMA),
        SamplingParams(temperature=0.8, seed=2, max_new_tokens=20, regex="(ab|cd)+e"),
        SamplingParams(temperature=0.0, max_new_tokens=20, choice=["x", "yy"]),
    ]
    # Constrained rows interleaved with the plain ones, on the same prompts.
    mixed = llm.generate(
        [p for i in range(3) for p in (PROMPTS[i], PROMPTS[3 - i])],
        [p for pair in zip(plain, constrained, strict=True) for p in pair],
    )
    assert [mixed[2 * i].token_ids for i in range(3)] == [o.token_ids for o in alone]
    assert mixed[5].finish_reason == "stop" and mixed[5].text in ("x", "yy")
    assert_idle(llm)


def test_a_request_whose_grammar_ends_while_its_next_step_is_in_flight(
    engines: dict[str, LLM],
) -> None:
    """Its next token's row gets every token allowed (the token is dropped), it finishes with
    reason stop, and its pages come back."""
    sched = engines["on"].scheduler
    seen = _record_samplings(sched)
    try:
        sched.add_request("short", [5, 6, 7], SamplingParams(temperature=0.0, choice=["ok"]))
        long = SamplingParams(temperature=0.0, max_new_tokens=12, regex="[a-z]{40}")
        sched.add_request("long", [8, 9], long)
        outs = _drain(sched)
    finally:
        _restore(sched)
    short = outs["short"]
    assert short[-1].finish_reason == "stop"
    assert sched.grammars.tokenizer.decode([o.token_id for o in short], True) == "ok"
    assert [o.finish_reason for o in outs["long"]][-1] == "length" and len(outs["long"]) == 12
    # The step after the one that ended it had "short" planned: its row allowed every token.
    last = max(i for i, (rids, _) in enumerate(seen) if "short" in rids)
    rids, bitmask = seen[last]
    assert bitmask is not None
    assert bool((bitmask[rids.index("short")] == -1).all())
    assert not bool((bitmask[rids.index("long")] == -1).all())
    assert_idle(engines["on"])


def test_a_request_aborted_between_its_forward_and_its_sampling(
    engines: dict[str, LLM],
) -> None:
    """An abort that arrives while the next step's forward runs (after the step before was read
    back, before this one's sampling): that row gets every token, its token is dropped, nothing
    of the request is left and the others go on."""
    sched = engines["on"].scheduler
    seen = _record_samplings(sched)
    complete = sched._complete
    aborted_at: list[int] = []

    def complete_then_abort(launched: Any) -> list[TokenOut]:
        outputs = complete(launched)
        victim = next((r for r in sched.running if r.rid == "victim"), None)
        if victim is not None and len(victim.output_ids) >= 4:
            assert sched.abort("victim")
            aborted_at.append(len(seen))
        return outputs

    sched._complete = complete_then_abort  # type: ignore[method-assign]
    try:
        params = SamplingParams(temperature=0.0, max_new_tokens=16, json_schema=SCHEMA)
        sched.add_request("victim", [11, 12, 13], params)
        sched.add_request("other", [14, 15], params)
        outs = _drain(sched)
    finally:
        _restore(sched)
    assert aborted_at, "never aborted"
    # The sampling launched right after the abort still had the victim's row, all allowed.
    rids, bitmask = seen[aborted_at[0]]
    assert "victim" in rids and bitmask is not None
    assert bool((bitmask[rids.index("victim")] == -1).all())
    assert all(o.finish_reason is None for o in outs["victim"])  # no token after the abort
    assert outs["other"][-1].finish_reason in ("stop", "length")
    assert_idle(engines["on"])


def test_retracted_constrained_requests_with_a_token_in_flight_stay_valid() -> None:
    """A pool too small for all of them: decoding requests are retracted (with overlap their
    newest token is then in flight) and resumed; outputs match the run without overlap."""
    regex = "[a-z]{3}(-[0-9]{3}){30}"  # longer than max_new_tokens: every output is a prefix
    params = [
        SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, max_new_tokens=32, regex=regex)
        for i in range(6)
    ]
    prompts = [[3 + i, 40 + i, 7] for i in range(6)]
    results = {}
    for mode in ("off", "on"):
        llm = LLM(progress=False, num_pages=16, page_size=4, overlap_schedule=mode)
        planner = llm.scheduler.planner
        retract = planner.retract
        in_flight: list[bool] = []  # per retraction: was its newest token in flight?

        def noting(req: Any, retract: Any = retract, in_flight: list[bool] = in_flight) -> None:
            in_flight.append(req.output_ids[-1] < 0)
            retract(req)

        planner.retract = noting  # type: ignore[method-assign]
        outs = llm.generate(prompts, params)
        assert llm.scheduler.stats().retractions > 0
        assert all(in_flight) if mode == "on" else not any(in_flight)
        for out in outs:
            assert out.finish_reason == "length" and len(out.token_ids) == 32
            assert re.fullmatch("[a-z]{3}(-[0-9]{3})*(-[0-9]{0,2})?", out.text or ""), out.text
        results[mode] = [o.token_ids for o in outs]
        assert_idle(llm)
        llm.close()
    assert results["on"] == results["off"]


@pytest.mark.slow
def test_two_tensor_parallel_ranks_split_constrained_steps_alike(tmp_path: Path) -> None:
    """Both ranks launch each constrained step's forward, complete the step before, then
    sample under the same bitmask: two ranks give the tokens one does."""
    model = make_checkpoint(tmp_path / "ckpt", "llama", seed=3)
    params = [
        SamplingParams(temperature=0.0, max_new_tokens=24, json_schema=SCHEMA),
        SamplingParams(temperature=0.9, seed=2, max_new_tokens=24, regex="[a-z]{4}-[0-9]{40}"),
        SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.0, max_new_tokens=8, choice=["alpha", "beta"]),
    ]
    results = []
    for tp in (1, 2):
        with LLM(str(model), tp_size=tp, overlap_schedule="on", progress=False) as llm:
            outs = llm.generate(PROMPTS, params)
            assert_idle(llm)
        results.append([(o.token_ids, o.finish_reason) for o in outs])
    assert results[0] == results[1]
    assert results[1][3][1] == "stop"
