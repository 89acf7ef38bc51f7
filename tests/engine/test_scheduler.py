"""End-to-end scheduler behaviour: prefix cache, chunked prefill, retraction, policies, abort."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from minisgl import LLM, SamplingParams
from minisgl.ipc.messages import TokenOut
from minisgl.llm import RequestOutput
from tests.helpers.engine_util import assert_idle

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)


def _prompts(n: int = 10, shared: int = 40, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 2048) for _ in range(shared)]
    return [
        prefix + [rng.randrange(3, 2048) for _ in range(rng.randrange(1, 30))] for _ in range(n)
    ]


def _engine(path: Path, **kw: Any) -> LLM:
    kw.setdefault("num_pages", 256)
    return LLM(str(path), progress=False, **kw)


@pytest.fixture(params=["off", "on"], ids=["sync", "overlap"])
def make(request: pytest.FixtureRequest, checkpoints: dict[str, Path]) -> Callable[..., LLM]:
    """Engines on the llama checkpoint, with and without overlap scheduling (on the CPU
    overlap changes nothing in timing, but runs every request through the placeholder path)."""
    return lambda **kw: _engine(checkpoints["llama"], overlap_schedule=request.param, **kw)


@pytest.fixture(scope="module")
def reference(checkpoints: dict[str, Path]) -> list[list[int]]:
    llm = _engine(checkpoints["llama"], disable_radix_cache=True)
    return [o.token_ids for o in llm.generate(_prompts(), GREEDY)]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"page_size": 1},
        {"chunked_prefill_size": 16},  # one page per step
        {"chunked_prefill_size": 7},
        {"page_size": 1, "chunked_prefill_size": 7, "disable_radix_cache": True},
        {"schedule_policy": "lpm", "page_size": 4},
    ],
)
def test_greedy_outputs_do_not_depend_on_cache_chunking_or_pages(
    make: Callable[..., LLM],
    reference: list[list[int]],
    options: dict[str, Any],
) -> None:
    llm = make(**options)
    # Two waves, so the second finds the first's prefixes in the cache.
    prompts = _prompts()
    first = llm.generate(prompts[:3], GREEDY)
    rest = llm.generate(prompts[3:], GREEDY)
    assert [o.token_ids for o in first + rest] == reference
    if not options.get("disable_radix_cache"):
        assert all(o.cached_tokens > 0 for o in rest)
    assert_idle(llm)


LONG = SamplingParams(temperature=0.0, max_new_tokens=80, ignore_eos=True)


@pytest.fixture(scope="module")
def long_reference(checkpoints: dict[str, Path]) -> list[list[int]]:
    llm = _engine(checkpoints["llama"], disable_radix_cache=True)
    return [o.token_ids for o in llm.generate(_prompts(), LONG)]


@pytest.mark.parametrize(
    "options",
    [
        {"page_size": 1, "num_pages": 240},
        {"page_size": 16, "num_pages": 15},
        {"page_size": 1, "num_pages": 240, "disable_radix_cache": True},
    ],
)
def test_retraction_under_a_tiny_pool_keeps_outputs(
    make: Callable[..., LLM],
    long_reference: list[list[int]],
    options: dict[str, Any],
) -> None:
    # Up to ~150 tokens per request, 10 requests: the pool holds only a couple at once.
    llm = make(**options)
    outs = llm.generate(_prompts(), LONG)
    assert [o.token_ids for o in outs] == long_reference
    assert llm.scheduler.stats().retractions > 0, "the pool was meant to force retractions"
    assert_idle(llm)


def test_shared_prefix_reports_cached_tokens_and_computes_fewer(
    make: Callable[..., LLM],
) -> None:
    page = 16
    shared = 64  # four whole pages
    prompts = _prompts(n=9, shared=shared, seed=1)
    computed = {}
    for disable in (False, True):
        llm = make(page_size=page, disable_radix_cache=disable)
        first = llm.generate(prompts[0], GREEDY)[0]
        rest = llm.generate(prompts[1:], GREEDY)
        stats = llm.scheduler.stats()
        computed[disable] = stats.computed_tokens
        assert first.cached_tokens == 0
        if disable:
            assert all(o.cached_tokens == 0 for o in rest)
        else:
            # The shared prefix is cached; requests in the second wave may also share
            # nothing more (they differ right after the prefix).
            assert [o.cached_tokens for o in rest] == [shared] * len(rest)
            assert stats.cached_tokens == shared * len(rest)
            assert stats.cache_hit_rate == pytest.approx(
                shared * len(rest) / sum(len(p) for p in prompts)
            )
        assert_idle(llm)
    assert computed[True] - computed[False] == shared * (len(prompts) - 1)


def test_identical_prompt_twice_reuses_all_but_the_last_token(
    make: Callable[..., LLM],
) -> None:
    llm = make(page_size=1)
    prompt = _prompts(n=1, shared=20)[0]
    a = llm.generate(prompt, GREEDY)[0]
    b = llm.generate(prompt, GREEDY)[0]
    assert a.token_ids == b.token_ids
    assert b.cached_tokens == len(prompt) - 1  # one token is always computed
    assert_idle(llm)


def _run(llm: LLM, until: int = 10_000) -> dict[str, RequestOutput]:
    done: dict[str, RequestOutput] = {}
    for _ in range(until):
        if not llm.has_unfinished():
            break
        for out in llm.step():
            done[out.rid] = out
    return done


@pytest.mark.parametrize("stage", ["queued", "prefill-chunk", "decoding", "retracted"])
def test_abort_at_every_stage(
    make: Callable[..., LLM],
    reference: list[list[int]],
    long_reference: list[list[int]],
    stage: str,
) -> None:
    options: dict[str, Any] = {"page_size": 1}
    if stage == "prefill-chunk":
        options["chunked_prefill_size"] = 8
    params = GREEDY
    if stage == "retracted":
        options["num_pages"] = 240
        params = LONG
    if stage == "queued":
        options["max_running_requests"] = 2
    llm = make(**options)
    prompts = _prompts()
    rids = [llm.submit(p, params) for p in prompts]
    victim = None
    sched = llm.scheduler
    for _ in range(500):
        if stage == "queued" and len(sched.waiting) > 2:
            victim = sched.waiting[-1].rid
        elif stage == "prefill-chunk":
            mid = [r for r in sched.running if 0 < r.num_computed < len(r.prompt_ids) - 1]
            victim = mid[0].rid if mid else None
        elif stage == "decoding":
            dec = [r for r in sched.running if r.is_decoding and r.output_ids]
            victim = dec[0].rid if dec else None
        elif stage == "retracted":
            back = [r for r in sched.waiting if r.output_ids]
            victim = back[0].rid if back else None
        if victim is not None:
            break
        llm.step()
    assert victim is not None, f"never reached stage {stage}"
    aborted = llm.abort(victim)
    assert aborted is not None and aborted.finish_reason == "abort"
    sched.check_invariants()
    done = _run(llm)
    expected = long_reference if stage == "retracted" else reference
    for rid, ref in zip(rids, expected, strict=True):
        if rid != victim:
            assert done[rid].token_ids == ref
    assert victim not in done
    assert_idle(llm)


def test_decodes_get_a_token_every_step_while_a_long_prompt_is_chunked(
    make: Callable[..., LLM],
) -> None:
    llm = make(page_size=16, chunked_prefill_size=16)
    params = SamplingParams(temperature=0.0, max_new_tokens=60, ignore_eos=True)
    short = [llm.submit(p, params) for p in _prompts(n=4, shared=4)]
    for _ in range(4):  # prefill the short ones (chunked too) until all decode
        llm.step()
    sched = llm.scheduler
    while not all(r.is_decoding for r in sched.running):
        llm.step()
    long_prompt = [5 + i % 1000 for i in range(200)]
    long_rid = llm.submit(long_prompt, SamplingParams(max_new_tokens=2, temperature=0.0))
    chunk_steps = 0
    while True:
        long_req = next((r for r in sched.running if r.rid == long_rid), None)
        if long_req is not None and long_req.output_ids:
            break
        events = sched.step()
        chunk_steps += 1
        got = {e.rid for e in events}
        assert set(short) <= got, "a decoding request missed a step during the long prefill"
    assert chunk_steps >= 200 // 16, "the long prompt should have needed many chunks"
    llm.abort(long_rid)
    for rid in short:
        llm.abort(rid)
    assert_idle(llm)


def test_requests_that_can_never_fit_are_rejected_up_front(make: Callable[..., LLM]) -> None:
    llm = make(page_size=16, num_pages=4)  # 64 tokens
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([7] * 40, SamplingParams(max_new_tokens=40))
    with pytest.raises(ValueError, match="context length"):
        llm.generate([7] * 512, SamplingParams(max_new_tokens=1))
    out = llm.generate([7] * 40, SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    assert len(out.token_ids) == 20
    assert_idle(llm)


@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
def test_lpm_admits_requests_with_a_cached_prefix_first(
    make: Callable[..., LLM], policy: str
) -> None:
    llm = make(page_size=4, max_running_requests=1, schedule_policy=policy)
    cached_prefix = _prompts(n=1, shared=32, seed=3)[0]
    llm.generate(cached_prefix, GREEDY)
    cold = llm.submit(_prompts(n=1, shared=32, seed=4)[0], GREEDY)
    warm = llm.submit([*cached_prefix[:32], 9, 9, 9], GREEDY)
    order = [out.rid for out in _run(llm).values()]
    assert order == ([warm, cold] if policy == "lpm" else [cold, warm])
    assert_idle(llm)


def test_stats_report_load(make: Callable[..., LLM]) -> None:
    llm = make(max_running_requests=2)
    for p in _prompts(n=5):
        llm.submit(p, GREEDY)
    llm.step()
    stats = llm.scheduler.stats()
    assert (stats.running, stats.waiting) == (2, 3)
    assert 0 < stats.pool_usage < 1
    _run(llm)
    assert llm.scheduler.stats().running == 0
    assert_idle(llm)


def test_overlap_reads_each_step_back_after_launching_the_next(
    checkpoints: dict[str, Path],
) -> None:
    llm = _engine(checkpoints["llama"], overlap_schedule="on")
    sched = llm.scheduler
    prompt = _prompts(n=1)[0]
    rid = llm.submit(prompt, GREEDY)
    assert sched.step() == []  # the prefill is launched; nothing has been read back
    (req,) = sched.running
    assert len(req.output_ids) == 1 and req.output_ids[0] < 0  # a placeholder
    first = sched.step()  # launches decode 1 (its input resolved on the device), reads prefill
    assert [e.rid for e in first] == [rid]
    assert req.output_ids[0] == first[0].token_id >= 0 and req.output_ids[1] < 0
    sched.check_invariants()
    tokens = [first[0].token_id] + [e.token_id for e in _events_until_done(llm)]
    sync = _engine(checkpoints["llama"], overlap_schedule="off").generate(prompt, GREEDY)[0]
    assert tokens == sync.token_ids
    sched.check_invariants()
    assert not sched.has_work() and not sched.running


def test_overlap_computes_one_dropped_token_after_a_stop(
    checkpoints: dict[str, Path], reference: list[list[int]]
) -> None:
    prompt, ref = _prompts()[0], reference[0]
    stop = next(t for i, t in enumerate(ref) if i >= 3 and t not in ref[:i])
    params = SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=[stop])
    computed = {}
    for mode in ("off", "on"):
        llm = _engine(checkpoints["llama"], overlap_schedule=mode)
        out = llm.generate(prompt, params)[0]
        assert out.token_ids == ref[: ref.index(stop) + 1]
        assert (out.finish_reason, out.matched_stop) == ("stop", stop)
        computed[mode] = llm.scheduler.stats().computed_tokens
        assert_idle(llm)
    # The step after the stop was already running when the stop token was read back.
    assert computed["on"] == computed["off"] + 1


def _events_until_done(llm: LLM) -> list[TokenOut]:
    events: list[TokenOut] = []
    for _ in range(1000):
        if not llm.scheduler.has_work():
            return events
        events += llm.scheduler.step()
    raise AssertionError("the scheduler never finished")


@pytest.mark.parametrize(("page_size", "num_pages"), [(1, 160), (16, 12), (4, 40)])
def test_overlap_matches_sync_with_stops_retraction_and_aborts(
    checkpoints: dict[str, Path], long_reference: list[list[int]], page_size: int, num_pages: int
) -> None:
    """Requests stop at tokens each produces often, in a pool small enough to retract them,
    while others are aborted mid-way: overlap scheduling gives exactly the synchronous run."""
    prompts = _prompts()
    # Request i stops at the first token of its unconstrained output that is new at or after
    # position 30 + 4i (or runs to the length limit if there is none).
    stops = [
        [next((t for j, t in enumerate(ref) if j >= 30 + 4 * i and t not in ref[:j]), -1)]
        for i, ref in enumerate(long_reference)
    ]
    params = [
        SamplingParams(
            temperature=0.0,
            max_new_tokens=80,
            stop_token_ids=s if s[0] >= 0 else [],
            ignore_eos=True,
        )
        for s in stops
    ]
    results = {}
    for mode in ("off", "on"):
        llm = _engine(
            checkpoints["llama"],
            overlap_schedule=mode,
            page_size=page_size,
            num_pages=num_pages,
        )
        rids = [llm.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
        done: dict[str, RequestOutput] = {}
        for step in range(10_000):
            if not llm.has_unfinished():
                break
            if step in (7, 23):  # aborts at fixed steps
                victim = rids[3 if step == 7 else 8]
                if victim not in done and (out := llm.abort(victim)) is not None:
                    done[victim] = out
            for out in llm.step():
                done[out.rid] = out
            llm.scheduler.check_invariants()
        results[mode] = [(done[r].token_ids, done[r].finish_reason) for r in rids]
        assert llm.scheduler.stats().retractions > 0
        assert_idle(llm)
    assert results["on"] == results["off"]
    assert sum(reason == "stop" for _, reason in results["on"]) >= 4


def test_overlap_request_retracted_while_its_stop_token_is_in_flight(
    checkpoints: dict[str, Path], reference: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop token is read back after the request went back to the queue: it finishes
    from there, and nothing of it is left behind."""
    llm = _engine(checkpoints["llama"], overlap_schedule="on", page_size=1)
    sched = llm.scheduler
    prompt, ref = _prompts()[0], reference[0]
    stop = next(t for i, t in enumerate(ref) if i >= 2 and t not in ref[:i])
    k = ref.index(stop)
    rid = llm.submit(
        prompt, SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=[stop])
    )
    plan_decodes = sched.planner._plan_decodes
    forced = []

    def retract_when_stop_is_in_flight() -> list[Any]:
        for r in list(sched.running):
            # Its (k+1)-th token, the stop, is sampled by the step in flight.
            if r.rid == rid and len(r.output_ids) == k + 1 and r.output_ids[k] < 0:
                sched.planner.retract(r)  # as if the pool had no page for its next token
                forced.append(r)
        return plan_decodes()

    monkeypatch.setattr(sched.planner, "_plan_decodes", retract_when_stop_is_in_flight)
    done = _run(llm)
    assert forced, "the request was never retracted with its stop token in flight"
    assert forced[0].row < 0 and forced[0] not in sched.waiting
    assert done[rid].token_ids == ref[: k + 1] and done[rid].finish_reason == "stop"
    assert_idle(llm)
