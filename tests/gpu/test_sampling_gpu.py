"""The fused sampling kernels on CUDA (`pytest -m gpu`): the split kernels against the
one-program-per-row kernel and the torch sampler at full vocabularies, batch 1..256, every
filter, float32 / bfloat16 / float16 logits, with the scratch memory poisoned first.

On the GPU, Triton's log and torch's may round differently in the last bit, so the token can
differ from the torch reference at a near-tie (a handful of rows in a million); the tokens must
always lie in the set filtered_probs keeps."""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from minisgl.engine import sampler
from minisgl.engine.sampler import SamplingBatch, filtered_probs, row_hash, uniform_noise
from minisgl.sampling_params import GREEDY_TEMPERATURE
from tests.helpers.sampling_batch import make_batch

pytestmark = pytest.mark.gpu
BATCHES = [1, 3, 8, 64, 256]
VOCABS = [151_936, 32_000]


@pytest.fixture(scope="module")
def k() -> Iterator[ModuleType]:
    assert torch.cuda.is_available(), "the gpu tests need a CUDA GPU"
    os.environ.pop("TRITON_INTERPRET", None)
    from minisgl.kernels import sampling

    if type(sampling._race_kernel).__name__ == "InterpretedFunction":
        sampling = importlib.reload(sampling)
    yield sampling


def poison() -> None:
    """Fill the caching allocator's free blocks with NaN bits, so scratch tensors a kernel
    forgets to write show up as wrong tokens."""
    sizes = [1 << 8, 1 << 10, 1 << 12, 1 << 14, 1 << 16] * 16  # the small-block pool
    sizes.append(min(torch.cuda.mem_get_info()[0] // 4, 1 << 30) // 4)  # and a large block
    junk = [torch.full((n,), -1, dtype=torch.int32, device="cuda") for n in sizes]
    del junk


def logits_of(rows: int, vocab: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = 3 * torch.randn(rows, vocab, device="cuda", generator=gen)
    logits[:, ::97] = float("-inf")  # banned ids
    return logits.to(dtype)


def batch(rows: int, vocab: int, seed: int, **params: object) -> SamplingBatch:
    gen = torch.Generator().manual_seed(seed)
    temp = 0.3 + 1.5 * torch.rand(rows, generator=gen)
    temp[::4] = 0.0
    seeds = torch.randint(0, 2**62, (rows,), generator=gen)
    steps = torch.randint(0, 2**20, (rows,), generator=gen)
    sb = make_batch(rows, vocab, temperature=temp, seeds=seeds, steps=steps, **params)  # type: ignore[arg-type]
    sampled = sb.temperature >= GREEDY_TEMPERATURE
    cut = sampled & ((sb.top_k < vocab) | (sb.top_p < 1.0))
    bound = int(sb.top_k[cut].max()) if bool(cut.any()) else 0
    fields = {f.name: getattr(sb, f.name) for f in dataclasses.fields(sb) if f.name != "max_top_k"}
    moved = {n: v.cuda() if isinstance(v, torch.Tensor) else v for n, v in fields.items()}
    return dataclasses.replace(sb, **moved, max_top_k=bound)


def gumbel_reference(logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    logits = logits.float()
    greedy = sb.temperature < GREEDY_TEMPERATURE
    inv_t = 1.0 / torch.where(greedy, 1.0, sb.temperature)
    gumbel = -torch.log(-torch.log(uniform_noise(sb.seeds, sb.steps, logits.shape[1])))
    kept = filtered_probs(logits, sb) > 0
    score = torch.where(kept, logits * inv_t[:, None] + gumbel, float("-inf"))
    return torch.where(greedy, logits.argmax(-1), score.argmax(-1))


def assert_near_ties_only(got: torch.Tensor, want: torch.Tensor) -> None:
    """At most 1 + 1% of the rows differ (last-bit differences of log / fma at near-ties)."""
    wrong = int((got != want).sum())
    assert wrong <= 1 + got.numel() // 100, f"{wrong} of {got.numel()} rows differ"


def fused(k: ModuleType, logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    cut = sb.use_top_k or sb.use_top_p
    poison()
    out: torch.Tensor = k.sample(
        logits,
        sb.temperature,
        sb.seeds,
        sb.steps,
        min_p=sb.min_p if sb.use_min_p else None,
        top_k=sb.top_k if cut else None,
        top_p=sb.top_p if sb.use_top_p else None,
        max_top_k=sb.max_top_k if cut else None,
    )
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("rows", BATCHES)
def test_split_kernel_is_the_one_program_kernel(
    k: ModuleType, rows: int, vocab: int, dtype: torch.dtype
) -> None:
    """Greedy and temperature rows: bit for bit the token of the one-program-per-row kernel
    (bfloat16 logits tie often: the lowest id wins in both)."""
    logits = logits_of(rows, vocab, dtype, seed=rows)
    sb = batch(rows, vocab, seed=rows)
    old = k.sample_rows_one_program(logits, sb.temperature, row_hash(sb.seeds, sb.steps))
    assert torch.equal(fused(k, logits, sb), old)
    greedy = sb.temperature < GREEDY_TEMPERATURE
    assert torch.equal(old[greedy], logits.float().argmax(-1)[greedy])


FILTERS: dict[str, dict[str, object]] = {
    "min_p": {"min_p": 0.05},
    "top_k": {"top_k": 50},
    "top_k_p": {"top_k": 200, "top_p": 0.9},
    "all": {"top_k": 1000, "top_p": 0.95, "min_p": 0.01},
    "mixed_k": {"top_k": [1, 20, 1024, -1], "top_p": [1.0, 0.5, 0.8, 1.0]},
    # cuts past the 1024 candidates: searched over the whole row
    "top_p": {"top_p": 0.9},
    "top_p_min_p": {"top_p": [0.95, 0.5], "min_p": 0.001},
    "top_k_5000": {"top_k": 5000, "top_p": [1.0, 0.99]},
}


def per_row(values: dict[str, object], rows: int) -> dict[str, object]:
    """Lists cycle over the rows; scalars apply to every row."""
    return {n: [v[i % len(v)] for i in range(rows)] if isinstance(v, list) else v
            for n, v in values.items()}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("rows", BATCHES)
@pytest.mark.parametrize("name", list(FILTERS))
def test_filtered_rows_match_torch(
    k: ModuleType, name: str, rows: int, vocab: int, dtype: torch.dtype
) -> None:
    logits = logits_of(rows, vocab, dtype, seed=7 * rows)
    sb = batch(rows, vocab, seed=rows, **per_row(FILTERS[name], rows))
    got = fused(k, logits, sb)
    kept = filtered_probs(logits.float(), sb) > 0
    sampled = sb.temperature >= GREEDY_TEMPERATURE
    assert bool(kept[torch.arange(rows, device="cuda"), got][sampled].all())
    assert_near_ties_only(got, gumbel_reference(logits, sb))


def test_ties_past_the_candidates_at_full_vocab(k: ModuleType) -> None:
    """bfloat16-like logits on a coarse grid: the top_k-th logit is tied with many others,
    beyond the candidates; the lowest ids of the tie are kept, as the stable sort keeps."""
    rows, vocab = 64, 151_936
    gen = torch.Generator(device="cuda").manual_seed(3)
    logits = torch.randn(rows, vocab, device="cuda", generator=gen).mul(2).round() / 2
    sb = batch(rows, vocab, seed=3, top_k=50)
    sb = dataclasses.replace(sb, temperature=torch.full((rows,), 20.0, device="cuda"))
    got = fused(k, logits, sb)
    assert_near_ties_only(got, gumbel_reference(logits, sb))


def test_flat_rows_cut_past_the_candidates(k: ModuleType) -> None:
    """Flat rows (temperature 5): top-p 0.9 keeps ~100k tokens, far past the candidates."""
    rows, vocab = 16, 151_936
    logits = logits_of(rows, vocab, torch.bfloat16, seed=5)
    sb = batch(rows, vocab, seed=5, **per_row({"top_p": 0.9, "min_p": [0.0, 0.1]}, rows))
    sb = dataclasses.replace(sb, temperature=torch.full((rows,), 5.0, device="cuda"))
    got = fused(k, logits, sb)
    assert (got == gumbel_reference(logits, sb)).float().mean().item() >= 0.9
    kept = filtered_probs(logits.float(), sb) > 0
    assert bool(kept[torch.arange(rows, device="cuda"), got].all())


def test_frequencies_follow_the_filtered_distribution(k: ModuleType) -> None:
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    n = 200_000
    logits = probs.log().repeat(n, 1).cuda()
    sb = batch(n, 6, seed=0, top_k=4, top_p=0.85, min_p=0.2)
    sb = dataclasses.replace(sb, temperature=torch.ones(n, device="cuda"))
    got = fused(k, logits, sb)
    expected = torch.tensor([0.4, 0.25, 0.15, 0.0, 0.0, 0.0]) / 0.8  # top-p keeps 3 (0.8)
    freq = torch.bincount(got, minlength=6).float().cpu() / n
    assert torch.allclose(freq, expected, atol=0.005), freq


@pytest.mark.parametrize("name", list(FILTERS))
def test_the_sampler_on_cuda_is_the_sampler_on_cpu(k: ModuleType, name: str) -> None:
    """sample() on CUDA (fused kernels) and on CPU (torch): the same tokens for a seeded batch
    but for near-ties."""
    rows, vocab = 64, 151_936
    logits = logits_of(rows, vocab, torch.float32, seed=11)
    sb = batch(rows, vocab, seed=11, **per_row(FILTERS[name], rows))
    assert sampler._sample_fused(logits, sb) is not None
    got = sampler.sample(logits, sb).token_ids
    cpu = dataclasses.replace(
        sb, **{f.name: getattr(sb, f.name).cpu() for f in dataclasses.fields(sb)
               if isinstance(getattr(sb, f.name), torch.Tensor)}
    )  # fmt: skip
    want = sampler.sample(logits.cpu(), cpu).token_ids
    assert (got.cpu() == want).float().mean().item() >= 0.98
