"""The fused sampling kernels against the torch sampler, on CPU through the Triton interpreter.

The interpreter runs each program in Python, so shapes are tiny and `chunk` is forced small
to split rows over several programs; the many-draw frequency checks live in
tests/gpu/test_sampling_gpu.py. Here the kernels must pick exactly the token of the torch
Gumbel race over the set `filtered_probs` keeps (`gumbel_reference`), and the same token as
the sampler's exponential race (`_sample_random`) but for float rounding at near-ties."""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from minisgl.engine import sampler
from minisgl.engine.sampler import SamplingBatch, filtered_probs, row_hash, uniform_noise
from minisgl.sampling_params import GREEDY_TEMPERATURE
from tests.helpers.sampling_batch import make_batch


@pytest.fixture(scope="module")
def k() -> Iterator[ModuleType]:
    os.environ["TRITON_INTERPRET"] = "1"
    from minisgl.kernels import sampling

    if type(sampling._race_kernel).__name__ != "InterpretedFunction":
        sampling = importlib.reload(sampling)
    yield sampling


def with_bound(sb: SamplingBatch, vocab: int) -> SamplingBatch:
    """`sb` with max_top_k set the way the scheduler computes it."""
    sampled = sb.temperature >= GREEDY_TEMPERATURE
    cut = sampled & ((sb.top_k < vocab) | (sb.top_p < 1.0))
    bound = int(sb.top_k[cut].max()) if bool(cut.any()) else 0
    return dataclasses.replace(sb, max_top_k=bound)


def gumbel_reference(logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    """argmax of l / T + Gumbel(u) over the tokens filtered_probs keeps (argmax for greedy)."""
    vocab = logits.shape[1]
    greedy = sb.temperature < GREEDY_TEMPERATURE
    inv_t = 1.0 / torch.where(greedy, 1.0, sb.temperature)
    gumbel = -torch.log(-torch.log(uniform_noise(sb.seeds, sb.steps, vocab)))
    kept = filtered_probs(logits, sb) > 0
    score = torch.where(kept, logits.float() * inv_t[:, None] + gumbel, float("-inf"))
    return torch.where(greedy, logits.argmax(-1), score.argmax(-1))


def race_reference(logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    """The sampler's own torch path (exponential race), greedy rows by argmax."""
    greedy = sb.temperature < GREEDY_TEMPERATURE
    return torch.where(greedy, logits.argmax(-1), sampler._sample_random(logits.float(), sb))


def fused(
    k: ModuleType, logits: torch.Tensor, sb: SamplingBatch, chunk: int, candidates: int = 1024
) -> torch.Tensor:
    cut = sb.use_top_k or sb.use_top_p
    out: torch.Tensor = k.sample(
        logits,
        sb.temperature,
        sb.seeds,
        sb.steps,
        min_p=sb.min_p if sb.use_min_p else None,
        top_k=sb.top_k if cut else None,
        top_p=sb.top_p if sb.use_top_p else None,
        max_top_k=sb.max_top_k if cut else None,
        candidates=candidates,
        chunk=chunk,
    )
    return out


def random_batch(rows: int, vocab: int, seed: int, **params: Any) -> SamplingBatch:
    gen = torch.Generator().manual_seed(seed)
    temp = 0.3 + 1.5 * torch.rand(rows, generator=gen)
    temp[::5] = 0.0  # greedy rows beside sampled ones
    seeds = torch.randint(0, 2**62, (rows,), generator=gen) * 2 + 1
    steps = torch.randint(0, 2**40, (rows,), generator=gen)
    return with_bound(
        make_batch(rows, vocab, temperature=temp, seeds=seeds, steps=steps, **params), vocab
    )


# ----- greedy and temperature rows ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("rows", "vocab", "chunk"), [(1, 1000, 128), (24, 300, 64)])
def test_split_rows_pick_the_one_program_kernels_token(
    k: ModuleType, dtype: torch.dtype, rows: int, vocab: int, chunk: int
) -> None:
    """Chunks (vocab not a multiple of chunk; batch 1 and more rows than chunks), ties, -inf
    tokens and an all -inf row: the same token as the one-program-per-row kernel."""
    gen = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, vocab, generator=gen).mul(2).round()  # many equal maxima
    logits[:, ::7] = float("-inf")
    logits[-1] = float("-inf") if rows > 1 else logits[-1]
    logits = logits.to(dtype)
    temp = torch.where(torch.arange(rows) % 3 == 0, 0.0, 0.8)
    hashes = row_hash(torch.arange(rows) * 7919 + (1 << 40), torch.arange(rows) % 5)
    old = k.sample_rows_one_program(logits, temp, hashes)
    assert torch.equal(k.sample(logits, temp, hashes, chunk=chunk), old)
    greedy = temp == 0
    assert torch.equal(old[greedy], logits.float().argmax(-1)[greedy])  # lowest id of ties
    if rows > 1:
        assert int(old[-1]) == 0  # all -inf: token 0, as torch.argmax


def test_row_hash_in_the_kernel_is_the_samplers(k: ModuleType) -> None:
    """Seeds over the full 63 bits and steps over 32 bits: hashing (seed, step) inside the
    kernel gives the same tokens as the precomputed minisgl.engine.sampler.row_hash."""
    rows, vocab = 24, 64
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(rows, vocab, generator=gen)
    seeds = torch.cat([torch.tensor([0, 1, 2**32 - 1, 2**32, 2**63 - 1]), torch.arange(19) << 28])
    steps = torch.randint(0, 2**33, (rows,), generator=gen)
    temp = torch.full((rows,), 5.0)  # flat: the token depends on the noise
    got = k.sample(logits, temp, seeds, steps, chunk=32)
    assert torch.equal(got, k.sample(logits, temp, row_hash(seeds, steps), chunk=32))
    sb = make_batch(rows, vocab, temperature=temp, seeds=seeds, steps=steps)
    assert torch.equal(got, gumbel_reference(logits, sb))


def test_greedy_rows_take_the_argmax(k: ModuleType) -> None:
    logits = torch.randn(16, 3000, generator=torch.Generator().manual_seed(0))
    temp = torch.zeros(16)
    seeds, steps = torch.arange(16), torch.zeros(16, dtype=torch.int64)
    got = k.sample_rows(logits, temp, row_hash(seeds, steps))
    assert torch.equal(got, logits.argmax(-1))


def test_matches_the_torch_exponential_race(k: ModuleType) -> None:
    """Same noise, same token: argmax(l/T + Gumbel) == argmax(softmax(l/T) / -log u)."""
    rows, vocab = 32, 2500
    logits = 2 * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(1))
    temp = torch.full((rows,), 0.7)
    temp[::5] = 0.0  # some greedy rows in the batch
    seeds = torch.arange(rows, dtype=torch.int64) * 7919 + (1 << 40)
    steps = torch.arange(rows, dtype=torch.int64) % 5
    sb = make_batch(rows, vocab, temperature=temp, seeds=seeds, steps=steps)
    probs = filtered_probs(logits, sb)
    race = (probs / -torch.log(uniform_noise(seeds, steps, vocab))).argmax(-1)
    expected = torch.where(temp == 0, logits.argmax(-1), race)
    got = k.sample_rows(logits, temp, row_hash(seeds, steps))
    assert (got == expected).float().mean().item() >= 0.98  # float rounding at near-ties only
    assert torch.equal(got[temp == 0], logits.argmax(-1)[temp == 0])
    assert torch.equal(got, gumbel_reference(logits, sb))


def test_masked_tokens_are_never_chosen(k: ModuleType) -> None:
    logits = torch.zeros(60, 50)
    logits[:, 7] = float("-inf")
    got = k.sample_rows(
        logits, torch.ones(60), row_hash(torch.arange(60), torch.zeros(60, dtype=torch.int64))
    )
    assert not (got == 7).any()


def test_tiny_temperatures_take_the_argmax(k: ModuleType) -> None:
    """Below GREEDY_TEMPERATURE a row is greedy: 1 / 1e-40 would overflow float32 to inf."""
    rows, vocab = 24, 700
    logits = 3 * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(2))
    logits[:, 0] = -50.0  # a NaN score would pick token 0
    temp = torch.tensor([(1e-40, 1e-30, 1e-8, 5e-6, 0.0, 0.9)[i % 6] for i in range(rows)])
    seeds, steps = torch.arange(rows), torch.zeros(rows, dtype=torch.int64)
    got = k.sample_rows(logits, temp, row_hash(seeds, steps))
    tiny = temp < 1e-5
    assert torch.equal(got[tiny], logits.argmax(-1)[tiny])
    assert not (got == 0).any()


# ----- min-p, top-k, top-p -----------------------------------------------------------------

FILTERS: dict[str, dict[str, Any]] = {
    "min_p": {"min_p": [0.0, 0.05, 0.3, 1.0]},
    "top_k": {"top_k": [1, 3, 40, -1]},
    "top_p": {"top_k": [50, 7, 50, 1], "top_p": [0.5, 0.9, 1.0, 0.2]},
    "all": {"top_k": [5, 50, 20, -1], "top_p": [0.8, 0.95, 0.5, 1.0], "min_p": [0.1, 0, 0.02, 0.5]},
}


def per_row(values: dict[str, Any], rows: int) -> dict[str, Any]:
    return {name: [v[i % len(v)] for i in range(rows)] for name, v in values.items()}


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("min_p", torch.float32), ("top_k", torch.float32), ("top_p", torch.float16),
     ("all", torch.float32), ("all", torch.float16)],
)  # fmt: skip
def test_filtered_rows_pick_the_torch_token(k: ModuleType, name: str, dtype: torch.dtype) -> None:
    """Each filter alone and all together, with greedy rows beside: exactly the torch Gumbel
    race over filtered_probs' kept set, and the sampler's exponential race but for rounding."""
    rows, vocab = 10, 500
    gen = torch.Generator().manual_seed(len(name))
    logits = (2 * torch.randn(rows, vocab, generator=gen)).to(dtype)
    sb = random_batch(rows, vocab, seed=3, **per_row(FILTERS[name], rows))
    got = fused(k, logits, sb, chunk=128)
    assert torch.equal(got, gumbel_reference(logits.float(), sb))
    assert (got == race_reference(logits.float(), sb)).float().mean().item() >= 0.9


def test_every_kept_token_can_win_and_no_other(k: ModuleType) -> None:
    """One row raced under 64 seeds at a high temperature: the tokens drawn are those of the
    torch reference, so the kept set's boundary (top-k, top-p and min-p at once) is the same."""
    rows, vocab = 32, 200
    row = 3 * torch.randn(vocab, generator=torch.Generator().manual_seed(9))
    logits = row.expand(rows, -1).clone()
    sb = random_batch(rows, vocab, seed=4, top_k=30, top_p=0.9, min_p=0.01)
    sb = dataclasses.replace(sb, temperature=torch.full((rows,), 3.0))
    got = fused(k, logits, sb, chunk=64)
    assert torch.equal(got, gumbel_reference(logits, sb))
    kept = filtered_probs(logits[:1], sb)[0] > 0
    assert bool(kept[got].all()) and len(set(got.tolist())) > 8


def test_ties_at_the_cut_keep_the_lowest_ids(k: ModuleType) -> None:
    """top_k 10 with the 8th..40th largest logits equal: the three lowest ids of the tie are
    kept, as the stable sort keeps them. With 10 candidates the tie reaches past them (counted
    per chunk); with 64 it fits (cut by id)."""
    rows, vocab = 24, 128
    gen = torch.Generator().manual_seed(11)
    logits = torch.full((rows, vocab), -5.0)
    tie = torch.randperm(vocab - 10, generator=gen)[:33] + 10
    logits[:, tie] = 0.0
    logits[:, :7] = torch.arange(7, 0, -1, dtype=torch.float32)
    kept = set(torch.cat([torch.arange(7), tie.sort().values[:3]]).tolist())
    for bound in (10, 64):
        sb = make_batch(rows, vocab, temperature=50.0, top_k=10, seeds=torch.arange(rows) * 31)
        sb = dataclasses.replace(sb, max_top_k=bound)
        got = fused(k, logits, sb, chunk=32)
        assert torch.equal(got, gumbel_reference(logits, sb))
        assert set(got.tolist()) <= kept and len(set(got.tolist()) - set(range(7))) >= 2, bound


def test_banned_tokens_beyond_the_finite_ones(k: ModuleType) -> None:
    """top_k above the number of finite logits: the cut lands on -inf, and no -inf token wins."""
    rows, vocab = 16, 120
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(12))
    logits[:, 6:] = float("-inf")
    filters = per_row({"top_p": [1.0, 0.7], "min_p": [0.0, 0.0, 0.2]}, rows)
    sb = random_batch(rows, vocab, seed=6, top_k=20, **filters)
    got = fused(k, logits, sb, chunk=32)
    assert bool((got < 6).all())
    assert torch.equal(got, gumbel_reference(logits, sb))


@pytest.mark.parametrize(
    "filters",
    [
        {"top_p": [0.95, 0.99, 0.6, 1.0]},
        {"top_k": [30, 100, 9, -1], "top_p": [0.97, 1.0, 1.0, 0.9], "min_p": [0.0, 0.01]},
    ],
)
def test_cuts_past_the_candidates_are_searched(k: ModuleType, filters: dict[str, Any]) -> None:
    """8 candidates for cuts 9..200 tokens down a flat row (top-p alone, top-k beyond the
    candidates, min-p beside), on a coarse grid of logits so the cut often falls in a tie:
    the whole-row search gives filtered_probs' kept set."""
    rows, vocab = 12, 200
    gen = torch.Generator().manual_seed(14)
    logits = torch.randn(rows, vocab, generator=gen).mul(4).round() / 4
    sb = random_batch(rows, vocab, seed=9, **per_row(filters, rows))
    sb = dataclasses.replace(sb, temperature=torch.where(sb.temperature > 0, 2.5, 0.0))
    got = fused(k, logits, sb, chunk=64, candidates=8)
    assert torch.equal(got, gumbel_reference(logits, sb))


# ----- the typed op and the sampler --------------------------------------------------------


def test_the_typed_ops_run_the_kernels_only_on_the_gpu_path(
    k: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """minisgl.kernels.fused_sample: None for a CPU tensor (the sampler's torch path),
    the kernels' tokens when the gate to the GPU path is open (forced here: the interpreter)."""
    import minisgl.kernels as ops

    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(4))
    temp = torch.tensor([0.0, 0.5, 1.0, 0.0, 2.0, 0.7])
    seeds, steps = torch.arange(6), torch.zeros(6, dtype=torch.int64)
    top_k = torch.full((6,), 5)
    assert ops.fused_sample(logits, temp, seeds, steps) is None
    monkeypatch.setattr(ops, "_on_gpu", lambda t: True)
    got = ops.fused_sample(logits, temp, seeds, steps)
    assert got is not None and torch.equal(got, k.sample(logits, temp, seeds, steps))
    got = ops.fused_sample(logits, temp, seeds, steps, top_k=top_k, max_top_k=5)
    want = k.sample(logits, temp, seeds, steps, top_k=top_k, max_top_k=5)
    assert got is not None and torch.equal(got, want)
    with pytest.raises(ValueError, match="max_top_k"):
        k.sample(logits, temp, seeds, steps, top_k=top_k, max_top_k=0)
    with pytest.raises(ValueError, match="chunk"):
        k.sample(logits, temp, seeds, steps, chunk=100)


def test_the_sampler_hands_batches_to_the_kernels(
    k: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sampler._sample_fused (what sample() runs on CUDA) against sample() on CPU: the same
    tokens for a mixed batch, with the bound on top_k or without it."""
    import minisgl.kernels as ops

    monkeypatch.setattr(ops, "_on_gpu", lambda t: True)
    rows, vocab = 10, 100
    logits = 2 * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(13))
    filters = per_row({"top_k": [20, 5, 12], "top_p": [1.0, 0.9]}, rows)
    sb = random_batch(rows, vocab, seed=7, min_p=0.05, **filters)
    assert sb.max_top_k == 20
    got = sampler._sample_fused(logits, sb)
    assert got is not None and torch.equal(got, gumbel_reference(logits, sb))
    assert (got == sampler.sample(logits, sb).token_ids).float().mean().item() >= 0.9
    unknown = sampler._sample_fused(logits, dataclasses.replace(sb, max_top_k=None))
    assert unknown is not None and torch.equal(unknown, got)
