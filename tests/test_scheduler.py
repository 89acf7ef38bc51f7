"""End-to-end scheduler behaviour: prefix cache, chunked prefill, retraction, policies, abort."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from minisgl import LLM, SamplingParams
from minisgl.llm import RequestOutput
from tests.engine_util import assert_idle

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
    checkpoints: dict[str, Path], reference: list[list[int]], options: dict[str, Any]
) -> None:
    llm = _engine(checkpoints["llama"], **options)
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
    checkpoints: dict[str, Path], long_reference: list[list[int]], options: dict[str, Any]
) -> None:
    # Up to ~150 tokens per request, 10 requests: the pool holds only a couple at once.
    llm = _engine(checkpoints["llama"], **options)
    outs = llm.generate(_prompts(), LONG)
    assert [o.token_ids for o in outs] == long_reference
    assert llm.scheduler.stats().retractions > 0, "the pool was meant to force retractions"
    assert_idle(llm)


def test_shared_prefix_reports_cached_tokens_and_computes_fewer(
    checkpoints: dict[str, Path],
) -> None:
    page = 16
    shared = 64  # four whole pages
    prompts = _prompts(n=9, shared=shared, seed=1)
    computed = {}
    for disable in (False, True):
        llm = _engine(checkpoints["llama"], page_size=page, disable_radix_cache=disable)
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
    checkpoints: dict[str, Path],
) -> None:
    llm = _engine(checkpoints["llama"], page_size=1)
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
    checkpoints: dict[str, Path],
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
    llm = _engine(checkpoints["llama"], **options)
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
    checkpoints: dict[str, Path],
) -> None:
    llm = _engine(checkpoints["llama"], page_size=16, chunked_prefill_size=16)
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


def test_requests_that_can_never_fit_are_rejected_up_front(checkpoints: dict[str, Path]) -> None:
    llm = _engine(checkpoints["llama"], page_size=16, num_pages=4)  # 64 tokens
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([7] * 40, SamplingParams(max_new_tokens=40))
    with pytest.raises(ValueError, match="context length"):
        llm.generate([7] * 512, SamplingParams(max_new_tokens=1))
    out = llm.generate([7] * 40, SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    assert len(out.token_ids) == 20
    assert_idle(llm)


@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
def test_lpm_admits_requests_with_a_cached_prefix_first(
    checkpoints: dict[str, Path], policy: str
) -> None:
    llm = _engine(checkpoints["llama"], page_size=4, max_running_requests=1, schedule_policy=policy)
    cached_prefix = _prompts(n=1, shared=32, seed=3)[0]
    llm.generate(cached_prefix, GREEDY)
    cold = llm.submit(_prompts(n=1, shared=32, seed=4)[0], GREEDY)
    warm = llm.submit([*cached_prefix[:32], 9, 9, 9], GREEDY)
    order = [out.rid for out in _run(llm).values()]
    assert order == ([warm, cold] if policy == "lpm" else [cold, warm])
    assert_idle(llm)


def test_stats_report_load(checkpoints: dict[str, Path]) -> None:
    llm = _engine(checkpoints["llama"], max_running_requests=2)
    for p in _prompts(n=5):
        llm.submit(p, GREEDY)
    llm.step()
    stats = llm.scheduler.stats()
    assert (stats.running, stats.waiting) == (2, 3)
    assert 0 < stats.pool_usage < 1
    _run(llm)
    assert llm.scheduler.stats().running == 0
    assert_idle(llm)
