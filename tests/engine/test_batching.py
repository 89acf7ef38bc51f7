"""Batch invariance and continuous batching: requests join and leave at any step, queue for
rows or KV pages, stop on stop/eos tokens or at max_new_tokens, and give the tokens they
give alone. Greedy float32 on CPU; logprobs of a request alone and in a batch agree to 1e-4.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from minisgl.attention.batch import ForwardBatch
from minisgl.llm import LLM, RequestOutput
from minisgl.sampling_params import SamplingParams
from tests.helpers.engine_util import assert_idle

VARIANT = "llama"
VOCAB = 2048
PAGE_SIZE = 4
# Every prompt has >= 2 tokens, so with unchunked prefill an extend length of 1 is a decode.
PROMPT_LENS = (2, 7, 13, 16, 24, 33, 50, 70)
MAX_NEW = (9, 3, 14, 6, 11, 5, 16, 8)
LOGPROB_ATOL = 1e-4


@dataclass(frozen=True)
class Batch:
    """What one forward step computed: new tokens and cached length per request."""

    extend_lens: list[int]
    seq_lens: list[int]

    @property
    def has_prefill(self) -> bool:
        return any(n > 1 for n in self.extend_lens)

    @property
    def has_decode(self) -> bool:
        return any(n == 1 for n in self.extend_lens)


def params(
    max_new: int,
    *,
    ignore_eos: bool = True,
    stop_token_ids: tuple[int, ...] = (),
    min_new_tokens: int = 0,
) -> SamplingParams:
    """Greedy, with the chosen token's logprob and the runner-up recorded."""
    return SamplingParams(
        temperature=0.0,
        max_new_tokens=max_new,
        min_new_tokens=min_new_tokens,
        stop_token_ids=list(stop_token_ids),
        ignore_eos=ignore_eos,
        logprobs=True,
        top_logprobs=2,
    )


def make_llm(path: Path, num_pages: int = 256, **options: Any) -> LLM:
    return LLM(str(path), page_size=PAGE_SIZE, num_pages=num_pages, progress=False, **options)


def pages_for(tokens: int) -> int:
    return -(-tokens // PAGE_SIZE)


@contextmanager
def record_batches(llm: LLM) -> Iterator[list[Batch]]:
    """Record every forward step's extend and sequence lengths."""
    runner = llm.runner
    original = runner.forward
    seen: list[Batch] = []

    def forward(batch: ForwardBatch) -> torch.Tensor:
        seen.append(Batch(list(batch.extend_lens_cpu), list(batch.seq_lens_cpu)))
        return original(batch)

    runner.forward = forward  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        del runner.forward  # back to the class's method


def run_to_completion(llm: LLM, max_steps: int = 1000) -> dict[str, RequestOutput]:
    """Step until nothing is left, checking the scheduler's invariants after every step."""
    done: dict[str, RequestOutput] = {}
    for _ in range(max_steps):
        if not llm.has_unfinished():
            return done
        for out in llm.step():
            done[out.rid] = out
        llm.scheduler.check_invariants()
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def assert_same_output(got: RequestOutput, want: RequestOutput) -> None:
    assert got.token_ids == want.token_ids
    assert got.finish_reason == want.finish_reason
    assert got.logprobs is not None and want.logprobs is not None
    torch.testing.assert_close(
        torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=LOGPROB_ATOL, rtol=0.0
    )


@pytest.fixture(scope="module")
def ckpt(checkpoints: dict[str, Path]) -> Path:
    return checkpoints[VARIANT]


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(4321)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module", params=["off", "on"], ids=["sync", "overlap"])
def overlap(request: pytest.FixtureRequest) -> str:
    """Every test runs with and without overlap scheduling (see minisgl.scheduler)."""
    param: str = request.param
    return param


@pytest.fixture(scope="module")
def llm(ckpt: Path, overlap: str) -> LLM:
    return make_llm(ckpt, overlap_schedule=overlap)


@pytest.fixture(scope="module")
def alone(ckpt: Path, prompts: list[list[int]]) -> list[RequestOutput]:
    """Each prompt run by itself, without overlap: the reference every run must reproduce."""
    llm = make_llm(ckpt, overlap_schedule="off")
    outs: list[RequestOutput] = []
    for p, m in zip(prompts, MAX_NEW, strict=True):
        with record_batches(llm) as batches:
            (out,) = llm.generate([p], params(m))
        assert all(len(b.extend_lens) == 1 for b in batches)
        outs.append(out)
    assert_idle(llm)
    return outs


def test_alone_respects_max_new_tokens(alone: list[RequestOutput]) -> None:
    for out, m in zip(alone, MAX_NEW, strict=True):
        assert len(out.token_ids) == m
        assert out.finish_reason == "length"
        assert out.matched_stop is None
        assert out.logprobs is not None and len(out.logprobs) == m


def test_staggered_arrivals_match_alone(
    llm: LLM, prompts: list[list[int]], alone: list[RequestOutput]
) -> None:
    """Requests arrive at different steps and leave at different steps; tokens are unchanged."""
    arrivals = {0: [0, 1, 2], 2: [3, 4], 3: [5], 6: [6, 7]}  # step -> prompts submitted before it
    rids: dict[int, str] = {}
    done: dict[str, RequestOutput] = {}
    finished_at: dict[str, int] = {}
    mixed_at_submit = False
    with record_batches(llm) as batches:
        for step in range(200):
            for i in arrivals.get(step, []):
                if llm.scheduler.stats().running > 0:
                    mixed_at_submit = True
                rids[i] = llm.submit(prompts[i], params(MAX_NEW[i]))
            for out in llm.step():
                done[out.rid] = out
                finished_at[out.rid] = step
            llm.scheduler.check_invariants()
            if len(done) == len(prompts):
                break
    assert len(done) == len(prompts)
    for i, want in enumerate(alone):
        assert_same_output(done[rids[i]], want)
    assert mixed_at_submit, "later requests should arrive while earlier ones run"
    # Prefill of newcomers shared a forward with decodes of running requests.
    assert any(b.has_prefill and b.has_decode for b in batches)
    assert max(len(b.extend_lens) for b in batches) >= 4
    assert len(set(finished_at.values())) >= 4, "requests should leave at different steps"
    assert_idle(llm)


def test_one_batch_matches_alone(
    llm: LLM, prompts: list[list[int]], alone: list[RequestOutput]
) -> None:
    """All eight submitted at once (one ragged prefill) give the same as alone."""
    with record_batches(llm) as batches:
        outs = llm.generate(prompts, [params(m) for m in MAX_NEW])
    assert batches[0].extend_lens == list(PROMPT_LENS)
    for got, want in zip(outs, alone, strict=True):
        assert_same_output(got, want)
    assert_idle(llm)


def test_max_running_requests(
    ckpt: Path, overlap: str, prompts: list[list[int]], alone: list[RequestOutput]
) -> None:
    """With two rows, six requests queue and all complete with unchanged output."""
    small = make_llm(ckpt, overlap_schedule=overlap, max_running_requests=2)
    rids = [small.submit(p, params(m)) for p, m in zip(prompts[:6], MAX_NEW[:6], strict=True)]
    assert small.scheduler.stats().waiting == 6
    most_running = 0
    saw_queue = False
    done: dict[str, RequestOutput] = {}
    with record_batches(small) as batches:
        for _ in range(500):
            for out in small.step():
                done[out.rid] = out
            small.scheduler.check_invariants()
            stats = small.scheduler.stats()
            most_running = max(most_running, stats.running)
            saw_queue |= stats.waiting > 0 and stats.running == 2
            if len(done) == len(rids):
                break
    assert len(done) == len(rids)
    for rid, want in zip(rids, alone[:6], strict=True):
        assert_same_output(done[rid], want)
    assert most_running == 2
    assert saw_queue
    assert max(len(b.extend_lens) for b in batches) == 2
    assert_idle(small)


def test_small_kv_pool_queues(
    ckpt: Path, overlap: str, prompts: list[list[int]], alone: list[RequestOutput]
) -> None:
    """A pool that fits the largest request (and little more) makes requests wait for pages."""
    needs = [pages_for(len(p) + m) for p, m in zip(prompts, MAX_NEW, strict=True)]
    num_pages = max(needs) + 4
    assert sum(needs) > 2 * num_pages  # far from everyone at once
    small = make_llm(ckpt, overlap_schedule=overlap, num_pages=num_pages)
    rids = [small.submit(p, params(m)) for p, m in zip(prompts, MAX_NEW, strict=True)]
    done: dict[str, RequestOutput] = {}
    saw_queue = False
    most_used = 0
    for _ in range(1000):
        for out in small.step():
            done[out.rid] = out
        small.scheduler.check_invariants()
        stats = small.scheduler.stats()
        saw_queue |= stats.waiting > 0 and stats.running > 0
        most_used = max(most_used, stats.total_pages - stats.free_pages)
        if len(done) == len(rids):
            break
    assert len(done) == len(rids)
    for rid, want in zip(rids, alone, strict=True):
        assert_same_output(done[rid], want)
    assert saw_queue
    assert 0 < most_used <= num_pages
    assert_idle(small)
    # A request that could never fit is refused up front instead of waiting forever.
    with pytest.raises(ValueError, match="KV cache"):
        small.submit(prompts[-1], params(num_pages * PAGE_SIZE))
    assert_idle(small)


def _stop_case(alone: list[RequestOutput]) -> tuple[int, int]:
    """A prompt whose 3rd greedy token first appears there, and that token."""
    for i, out in enumerate(alone):
        toks = out.token_ids
        if len(toks) >= 8 and toks[2] not in toks[:2]:
            return i, toks[2]
    raise AssertionError("no prompt with a fresh 3rd token; pick other prompts")


@pytest.mark.parametrize("ignore_eos", [True, False])
def test_stop_token_ids(
    llm: LLM, prompts: list[list[int]], alone: list[RequestOutput], ignore_eos: bool
) -> None:
    """stop_token_ids end a request at that token (ignore_eos only concerns the eos ids)."""
    i, stop = _stop_case(alone)
    ref = alone[i].token_ids
    out = llm.generate(
        [prompts[i]], params(MAX_NEW[i], stop_token_ids=(stop,), ignore_eos=ignore_eos)
    )[0]
    assert out.token_ids == ref[:3]
    assert out.finish_reason == "stop"
    assert out.matched_stop == stop
    assert_idle(llm)


def test_min_new_tokens_defers_stop(
    llm: LLM, prompts: list[list[int]], alone: list[RequestOutput]
) -> None:
    """Before min_new_tokens a stop token may not be sampled: greedy takes the runner-up."""
    i, stop = _stop_case(alone)
    ref = alone[i]
    assert ref.top_logprobs is not None
    top, runner_up = ref.top_logprobs[2][0][0], ref.top_logprobs[2][1][0]
    assert top == stop
    min_new = 6
    out = llm.generate(
        [prompts[i]], params(MAX_NEW[i], stop_token_ids=(stop,), min_new_tokens=min_new)
    )[0]
    assert out.token_ids[:3] == [*ref.token_ids[:2], runner_up]
    assert len(out.token_ids) >= min_new
    assert stop not in out.token_ids[:min_new]
    if out.finish_reason == "stop":
        assert out.matched_stop == stop and out.token_ids[-1] == stop
    else:
        assert out.finish_reason == "length" and len(out.token_ids) == MAX_NEW[i]
    # Logprobs stay those of the raw model, not of the constrained distribution.
    assert out.top_logprobs is not None and out.top_logprobs[2][0][0] == stop
    assert_idle(llm)


def test_eos_from_checkpoint(
    ckpt: Path, overlap: str, tmp_path: Path, prompts: list[list[int]], alone: list[RequestOutput]
) -> None:
    """The checkpoint's eos id stops generation unless ignore_eos; min_new_tokens defers it."""
    i, stop = _stop_case(alone)
    path = tmp_path / "eos"
    shutil.copytree(ckpt, path)
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((path / name).read_text())
        cfg["eos_token_id"] = stop
        (path / name).write_text(json.dumps(cfg))
    eos_llm = make_llm(path, overlap_schedule=overlap)
    ref = alone[i]
    assert ref.top_logprobs is not None
    runner_up = ref.top_logprobs[2][1][0]
    m = MAX_NEW[i]
    stopped, ignored, boundary, deferred = eos_llm.generate(
        [prompts[i]] * 4,
        [
            params(m, ignore_eos=False),
            params(m, ignore_eos=True),
            # The eos may be the 3rd token once 2 are out, but not while fewer than 3 are.
            params(m, ignore_eos=False, min_new_tokens=2),
            params(m, ignore_eos=False, min_new_tokens=3),
        ],
    )
    assert stopped.token_ids == ref.token_ids[:3]
    assert (stopped.finish_reason, stopped.matched_stop) == ("stop", stop)
    assert ignored.token_ids == ref.token_ids
    assert (ignored.finish_reason, ignored.matched_stop) == ("length", None)
    assert boundary.token_ids == ref.token_ids[:3]
    assert (boundary.finish_reason, boundary.matched_stop) == ("stop", stop)
    assert deferred.token_ids[:3] == [*ref.token_ids[:2], runner_up]
    assert len(deferred.token_ids) > 3
    assert_idle(eos_llm)


def test_max_new_tokens_and_context_limit(
    ckpt: Path, overlap: str, llm: LLM, prompts: list[list[int]], alone: list[RequestOutput]
) -> None:
    """max_new_tokens=1 finishes at the prefill step; the context length caps generation."""
    outs = llm.generate(prompts, params(1))
    assert [o.token_ids for o in outs] == [a.token_ids[:1] for a in alone]
    assert all(o.finish_reason == "length" for o in outs)
    assert_idle(llm)

    i = 4  # 24 prompt tokens, 11 new ones alone
    short = make_llm(ckpt, overlap_schedule=overlap, max_model_len=len(prompts[i]) + 5)
    out = short.generate([prompts[i]], params(MAX_NEW[i]))[0]
    assert out.token_ids == alone[i].token_ids[:5]
    assert out.finish_reason == "length"
    assert_idle(short)


def test_every_batch_tensor_is_16_byte_aligned() -> None:
    """Triton compiles a kernel again for each new combination of aligned / unaligned pointer
    arguments, so views into the packed host-to-device buffers must all start 16 bytes in
    (else a GPU run stalls on compiles the first time a batch shape hits a new combination).
    Odd numbers of requests and tokens, prefill chunks, decodes and sampling options."""
    llm = LLM(progress=False, page_size=4, chunked_prefill_size=37)
    seen: list[tuple[str, torch.Tensor]] = []
    forward, sample = llm.runner.forward, llm.runner.sample

    def tensors(obj: Any) -> list[tuple[str, torch.Tensor]]:
        fields = vars(obj).items()
        return [(k, v) for k, v in fields if isinstance(v, torch.Tensor) and v.numel()]

    def spy_forward(batch: ForwardBatch) -> torch.Tensor:
        seen.extend(tensors(batch))
        return forward(batch)

    def spy_sample(logits: torch.Tensor, sb: Any) -> Any:
        seen.extend(tensors(sb))
        return sample(logits, sb)

    llm.runner.forward = spy_forward  # type: ignore[method-assign]
    llm.runner.sample = spy_sample  # type: ignore[method-assign]
    prompts = [[5 + i] * (3 + 7 * i) for i in range(5)]
    params = [
        SamplingParams(temperature=0.7 * (i % 2), top_p=0.9, min_p=0.05 * i, max_new_tokens=3 + i)
        for i in range(5)
    ]
    llm.generate(prompts, params)
    assert {name for name, _ in seen} >= {
        "positions", "out_slots", "req_rows", "seq_lens", "extend_lens",
        "temperature", "top_p", "min_p", "top_k", "seeds", "steps",
    }  # fmt: skip
    bad = sorted({name for name, t in seen if t.data_ptr() % 16})
    assert not bad, f"tensors not 16-byte aligned: {bad}"
