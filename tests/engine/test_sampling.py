"""Sampling: the batched sampler on constructed distributions, penalties, SamplingParams
validation, and end-to-end seeds / logprobs through `LLM` against the HF reference model.

Every random draw here comes from fixed seeds (the sampler's noise is a pure function of
seed, step and token id), so the statistical checks are deterministic and cannot flake.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from minisgl.engine.sampler import (
    Penalties,
    apply_penalties,
    filtered_probs,
    sample,
    uniform_noise,
)
from minisgl.llm import LLM, RequestOutput
from minisgl.sampling_params import GREEDY_TEMPERATURE, SamplingParams
from tests.helpers.checkpoints import load_hf
from tests.helpers.engine_util import assert_idle
from tests.helpers.sampling_batch import make_batch

# ----- helpers -----------------------------------------------------------------------------


def draw(logits_row: torch.Tensor, n: int, seed0: int = 0, **params: Any) -> torch.Tensor:
    """`n` samples from one distribution: n rows with seeds seed0.. and varying steps."""
    logits = logits_row.float().expand(n, -1).clone()
    sb = make_batch(
        n,
        logits.shape[1],
        seeds=torch.arange(seed0, seed0 + n),
        steps=torch.arange(n) % 7,
        **params,
    )
    return sample(logits, sb).token_ids


def assert_close(got: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    """Same shape and |got - expected| <= atol everywhere (cheaper than torch.testing's)."""
    assert got.shape == expected.shape, (got.shape, expected.shape)
    err = float((got.double() - expected.double()).abs().max()) if got.numel() else 0.0
    assert err <= atol, f"max abs error {err:.3g} > {atol}: {got} vs {expected}"


def chi2_bound(df: int) -> float:
    """Mean + 7 standard deviations of a chi-square with `df` degrees of freedom."""
    return df + 7.0 * math.sqrt(2.0 * df)


def assert_distribution(ids: torch.Tensor, probs: torch.Tensor) -> None:
    """Tokens outside the support never occur; frequencies inside pass a chi-square bound."""
    probs = probs / probs.sum()
    counts = torch.bincount(ids, minlength=probs.numel()).double()
    outside = probs == 0
    assert counts[outside].sum() == 0, f"sampled outside the support: {counts.tolist()}"
    expected = ids.numel() * probs.double()
    support = ~outside
    chi2 = float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())
    df = int(support.sum()) - 1
    if df == 0:
        return
    assert chi2 < chi2_bound(df), (
        f"chi2 {chi2:.1f} (df {df}): counts {counts.tolist()} vs {expected.tolist()}"
    )


def ranked_logits(probs_by_rank: Sequence[float], order: Sequence[int]) -> torch.Tensor:
    """Logits over len(order) tokens; token order[r] gets probability probs_by_rank[r]."""
    logits = torch.empty(len(order))
    for rank, token in enumerate(order):
        logits[token] = math.log(probs_by_rank[rank])
    return logits


def only(tokens: Sequence[int], probs: torch.Tensor) -> torch.Tensor:
    """`probs` with every token but `tokens` zeroed (the expected filtered distribution)."""
    out = torch.zeros_like(probs)
    out[list(tokens)] = probs[list(tokens)]
    return out


# ----- greedy, filters, frequencies --------------------------------------------------------


def test_greedy_is_argmax() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=gen) * 3
    sb = make_batch(64, 300, temperature=0.0, top_k=5, top_p=0.5, seeds=torch.arange(64) * 7919)
    assert sb.all_greedy
    assert torch.equal(sample(logits, sb).token_ids, logits.argmax(-1))


def test_greedy_rows_stay_argmax_in_a_sampled_batch() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(200, 100, generator=gen)
    temperature = [0.0 if i % 2 == 0 else 1.5 for i in range(200)]
    ids = sample(logits, make_batch(200, 100, temperature=temperature)).token_ids
    greedy = torch.arange(200) % 2 == 0
    assert torch.equal(ids[greedy], logits.argmax(-1)[greedy])
    # The sampled rows really sample: at temperature 1.5 most do not pick the argmax.
    assert (ids[~greedy] != logits.argmax(-1)[~greedy]).float().mean() > 0.5


TINY = [1e-40, 1e-30, 1e-8, 5e-6]  # all below GREEDY_TEMPERATURE; 1e-40 overflows 1 / T


@pytest.mark.parametrize("filters", [{}, {"top_k": 5, "top_p": 0.9, "min_p": 0.05}])
def test_tiny_temperatures_sample_greedily_beside_sampled_rows(filters: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(3)
    n = 120
    logits = torch.randn(n, 200, generator=gen) * 4
    logits[:, 0] = -50.0  # NaN probabilities would pick token 0: it must never be chosen
    temperature = [(*TINY, 0.8)[i % 5] for i in range(n)]
    sb = make_batch(n, 200, temperature=temperature, **filters)
    assert not sb.all_greedy
    tiny = torch.tensor(temperature) < GREEDY_TEMPERATURE
    ids = sample(logits, sb).token_ids
    assert torch.equal(ids[tiny], logits.argmax(-1)[tiny])
    assert not (ids == 0).any()
    assert torch.isfinite(filtered_probs(logits, sb)).all()
    # Just above the threshold the temperature is used as it is: still no overflow.
    sb = make_batch(n, 200, temperature=2 * GREEDY_TEMPERATURE, **filters)
    assert torch.equal(sample(logits, sb).token_ids, logits.argmax(-1))
    assert torch.isfinite(filtered_probs(logits, sb)).all()


def test_tiny_temperature_params_are_greedy() -> None:
    for t in (0.0, *TINY):
        assert SamplingParams(temperature=t).greedy
    assert not SamplingParams(temperature=GREEDY_TEMPERATURE).greedy
    assert not SamplingParams(temperature=0.01).greedy


@pytest.mark.parametrize("k", [1, 2, 5])
def test_top_k_only_emits_the_k_most_likely(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    logits = torch.randn(40, generator=gen) * 1.5
    probs = torch.softmax(logits, -1)
    ids = draw(logits, 4000, seed0=1000 * k, top_k=k)
    allowed = logits.topk(k).indices.tolist()
    assert set(ids.tolist()) <= set(allowed)
    assert set(ids.tolist()) == set(allowed)  # and every one of them does occur
    assert_distribution(ids, only(allowed, probs))


@pytest.mark.parametrize(("top_k", "top_p"), [(3, 1.0), (9, 0.3)])
def test_ties_at_the_cut_keep_the_lowest_ids(top_k: int, top_p: float) -> None:
    """Equal probabilities rank by token id (the GPU kernels keep the same set): of the tokens
    tied at the cut, the lowest ids are kept, wherever the tie lies in the vocabulary."""
    logits = torch.full((300,), -3.0)
    tied = torch.tensor([290, 17, 5, 250, 101, 33])
    logits[tied] = 1.0
    logits[120] = 2.0
    ids = draw(logits, 3000, seed0=41, top_k=top_k, top_p=top_p)
    # top_p 0.3: 2.0's mass is 0.19 of the row and each tied token's 0.07, so the prefix
    # reaching 0.3 ends with the second tied token.
    assert set(ids.tolist()) == {120, 5, 17}


# Probabilities by rank, scattered over token ids so that sorting is exercised.
TOP_P_PROBS = [0.5, 0.3, 0.15, 0.05]
TOP_P_ORDER = [2, 0, 3, 1]


@pytest.mark.parametrize(
    ("top_p", "kept_ranks"),
    [(0.4, [0]), (0.7, [0, 1]), (0.9, [0, 1, 2]), (0.99, [0, 1, 2, 3])],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p: float, kept_ranks: list[int]) -> None:
    logits = ranked_logits(TOP_P_PROBS, TOP_P_ORDER)
    ids = draw(logits, 4000, seed0=17, top_p=top_p)
    kept = [TOP_P_ORDER[r] for r in kept_ranks]
    assert set(ids.tolist()) == set(kept)
    assert_distribution(ids, only(kept, torch.softmax(logits, -1)))


MIN_P_PROBS = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]
MIN_P_ORDER = [4, 1, 5, 0, 3, 2]


@pytest.mark.parametrize(
    ("min_p", "kept_ranks"),
    [(0.9, [0]), (0.3, [0, 1, 2]), (0.2, [0, 1, 2, 3]), (0.05, [0, 1, 2, 3, 4, 5])],
)
def test_min_p_drops_tokens_below_min_p_times_max(min_p: float, kept_ranks: list[int]) -> None:
    logits = ranked_logits(MIN_P_PROBS, MIN_P_ORDER)
    probs = torch.softmax(logits, -1)
    ids = draw(logits, 4000, seed0=99, min_p=min_p)
    assert bool((probs[ids] >= min_p * probs.max()).all())
    kept = [MIN_P_ORDER[r] for r in kept_ranks]
    assert set(ids.tolist()) == set(kept)
    assert_distribution(ids, only(kept, probs))


@pytest.mark.parametrize(
    ("top_k", "top_p", "min_p", "kept_ranks"),
    [
        (2, 0.95, 0.1, [0, 1]),  # top-k binds
        (5, 0.6, 0.05, [0, 1]),  # top-p binds
        (5, 0.95, 0.5, [0, 1]),  # min-p binds
        (3, 0.99, 0.3, [0, 1, 2]),  # all three agree
        (4, 0.3, 0.3, [0]),  # top-p keeps only the first
    ],
)
def test_combined_filters_keep_the_intersection(
    top_k: int, top_p: float, min_p: float, kept_ranks: list[int]
) -> None:
    logits = ranked_logits(MIN_P_PROBS, MIN_P_ORDER)
    ids = draw(logits, 4000, seed0=5, top_k=top_k, top_p=top_p, min_p=min_p)
    kept = [MIN_P_ORDER[r] for r in kept_ranks]
    assert set(ids.tolist()) == set(kept)
    assert_distribution(ids, only(kept, torch.softmax(logits, -1)))


def test_filters_do_not_leak_between_rows() -> None:
    """Each row sampled alone gives the same token as inside a batch of different settings."""
    gen = torch.Generator().manual_seed(3)
    n, vocab = 48, 64
    logits = torch.randn(n, vocab, generator=gen) * 2
    params: dict[str, Any] = dict(
        temperature=[(0.0, 0.7, 1.0, 1.3)[i % 4] for i in range(n)],
        top_k=[(-1, 3, 10, 0)[i % 4] for i in range(n)],
        top_p=[(1.0, 0.8, 1.0, 0.5)[(i // 4) % 4] for i in range(n)],
        min_p=[(0.0, 0.0, 0.2)[i % 3] for i in range(n)],
        seeds=[1234 + 17 * i for i in range(n)],
        steps=[i % 5 for i in range(n)],
    )
    batched = sample(logits, make_batch(n, vocab, **params)).token_ids
    for i in range(n):
        row: dict[str, Any] = {name: [values[i]] for name, values in params.items()}
        alone = sample(logits[i : i + 1], make_batch(1, vocab, **row)).token_ids
        assert int(alone) == int(batched[i]), f"row {i}"


@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.0])
def test_unfiltered_sampling_matches_the_distribution(temperature: float) -> None:
    logits = torch.tensor([1.2, -0.3, 0.8, 0.0, -1.5, 0.4, 2.0])
    ids = draw(logits, 20000, seed0=int(temperature * 1000), temperature=temperature)
    assert_distribution(ids, torch.softmax(logits / temperature, -1))


def test_sampling_temperature_changes_the_distribution() -> None:
    """The chi-square check has power: samples at T=2 fail the T=1 distribution."""
    logits = torch.tensor([1.2, -0.3, 0.8, 0.0, -1.5, 0.4, 2.0])
    ids = draw(logits, 20000, seed0=2000, temperature=2.0)
    with pytest.raises(AssertionError, match="chi2"):
        assert_distribution(ids, torch.softmax(logits, -1))


# ----- noise -------------------------------------------------------------------------------


def test_uniform_noise_in_open_unit_interval() -> None:
    seeds = torch.tensor([0, 1, 2, 12345, 2**32 - 1, 2**32, 2**62 + 7, 2**63 - 1] * 64)
    steps = torch.arange(seeds.numel()) * 104729
    u = uniform_noise(seeds, steps, 4096)
    assert u.dtype == torch.float32
    assert bool((u > 0).all()) and bool((u < 1).all())
    assert abs(float(u.mean()) - 0.5) < 0.005
    hist = torch.histc(u, bins=10, min=0.0, max=1.0) / u.numel()
    assert bool(((hist - 0.1).abs() < 0.005).all()), hist.tolist()


def test_uniform_noise_never_rounds_to_one() -> None:
    """Regression: (h >> 8) + 0.5 is not representable in float32 at the top of the range.

    For (h >> 8) == 2**24 - 1 the float32 sum rounds up and u == 1.0 exactly (about once in
    2**24 draws, i.e. in ~1% of steps with a 150k vocabulary). Seed 1799, step 0, token 2340
    is such a draw (found by scanning seeds 0..4095 at vocab 4096).
    """
    u = uniform_noise(torch.tensor([1799]), torch.tensor([0]), 4096)
    assert float(u.max()) < 1.0, f"u == {float(u.max())} at token {int(u.argmax())}"


def test_filtered_token_is_never_sampled_even_when_its_noise_is_extreme() -> None:
    """With u == 1.0, -log(u) == -0.0 and 0 / -0.0 = NaN wins the argmax: a token with
    probability zero (filtered by top-k or banned) gets sampled."""
    vocab = 2341
    logits = torch.zeros(1, vocab)
    logits[0, 0] = 10.0
    top1 = make_batch(1, vocab, top_k=1, seeds=[1799], steps=[0])
    assert int(sample(logits, top1).token_ids) == 0
    banned = make_batch(1, vocab, seeds=[1799], steps=[0], banned_ids=torch.tensor([[2340, vocab]]))
    assert int(sample(logits, banned).token_ids) != 2340


def test_uniform_noise_is_a_pure_function_of_seed_step_token() -> None:
    seeds = torch.tensor([5, 5, 6, 5, 5 + 2**32])
    steps = torch.tensor([0, 0, 0, 1, 0])
    u = uniform_noise(seeds, steps, 512)
    assert torch.equal(u, uniform_noise(seeds, steps, 512))
    assert torch.equal(u[0], u[1])  # identical inputs, identical noise
    for other in (2, 3, 4):  # another seed, another step, another high word of the seed
        assert not torch.equal(u[0], u[other])
        assert float((u[0] == u[other]).float().mean()) < 0.01
    assert torch.unique(u[0]).numel() > 500  # tokens of one row differ
    # A row does not depend on the rows beside it or on the vocabulary size.
    assert torch.equal(uniform_noise(seeds[3:4], steps[3:4], 512), u[3:4])
    assert torch.equal(uniform_noise(seeds, steps, 100), u[:, :100])


# ----- penalties and banned ids ------------------------------------------------------------


def _padded(rows: list[list[int]], vocab: int) -> torch.Tensor:
    width = max(1, *(len(r) for r in rows))
    return torch.tensor([r + [vocab] * (width - len(r)) for r in rows], dtype=torch.int64)


def _expected_penalised(
    logits: list[float],
    prompt: list[int],
    output: list[int],
    rep: float,
    presence: float,
    frequency: float,
) -> list[float]:
    out = []
    for token, x in enumerate(logits):
        if token in prompt or token in output:
            x = x / rep if x > 0 else x * rep
        count = output.count(token)
        out.append(x - frequency * count - presence * (count > 0))
    return out


PENALTY_ROWS: list[tuple[list[int], list[int], float, float, float]] = [
    # prompt, output, repetition, presence, frequency
    ([0, 1, 1], [2, 4, 2, 2], 1.5, 0.4, 0.25),
    ([3], [], 2.0, 1.0, 1.0),  # no output yet: only the repetition penalty on the prompt
    ([], [5, 6, 5], 1.0, -0.5, 0.5),  # negative presence encourages
    ([1, 6], [0], 0.8, 0.0, 0.0),  # repetition < 1 encourages
    ([0, 2, 4], [1, 3], 1.0, 0.0, 0.0),  # all off: unchanged
]


def test_apply_penalties_matches_the_definitions() -> None:
    vocab = 8
    base = [2.0, -1.0, 0.5, -3.0, 1.5, 0.0, 4.0, -0.25]
    logits = torch.tensor([base] * len(PENALTY_ROWS))
    pen = Penalties(
        repetition=torch.tensor([r[2] for r in PENALTY_ROWS]),
        presence=torch.tensor([r[3] for r in PENALTY_ROWS]),
        frequency=torch.tensor([r[4] for r in PENALTY_ROWS]),
        seen_ids=_padded([r[0] + r[1] for r in PENALTY_ROWS], vocab),
        output_ids=_padded([r[1] for r in PENALTY_ROWS], vocab),
    )
    got = apply_penalties(logits.clone(), pen)
    expected = torch.tensor([_expected_penalised(base, *row) for row in PENALTY_ROWS])
    assert_close(got, expected, atol=1e-6)
    assert not torch.equal(got[0], logits[0])
    assert torch.equal(got[-1], logits[-1])


def test_repetition_penalty_agrees_with_transformers() -> None:
    gen = torch.Generator().manual_seed(4)
    vocab = 50
    logits = torch.randn(3, vocab, generator=gen) * 3
    seen = [[1, 2, 3, 3, 40], [0], [7, 8, 9, 10, 11, 12, 49]]
    for row, ids in enumerate(seen):
        ref = RepetitionPenaltyLogitsProcessor(1.7)(
            torch.tensor([ids]), logits[row : row + 1].clone()
        )
        pen = Penalties(
            repetition=torch.tensor([1.7]),
            presence=torch.zeros(1),
            frequency=torch.zeros(1),
            seen_ids=torch.tensor([ids]),
            output_ids=torch.tensor([[vocab]]),
        )
        assert_close(apply_penalties(logits[row : row + 1].clone(), pen), ref, atol=1e-6)


def test_penalties_steer_sampling() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0, -1.0]])
    pen = Penalties(
        repetition=torch.tensor([1.0]),
        presence=torch.tensor([0.0]),
        frequency=torch.tensor([0.2]),
        seen_ids=torch.tensor([[0]]),
        output_ids=torch.tensor([[0]]),
    )
    assert int(sample(logits, make_batch(1, 4, temperature=0.0)).token_ids) == 0
    sb = make_batch(1, 4, temperature=0.0, penalties=pen)
    assert int(sample(logits, sb).token_ids) == 1


def test_banned_ids_are_never_sampled() -> None:
    vocab, n = 16, 3000
    logits = torch.zeros(n, vocab)
    logits[:, 3] = 4.0  # the favourite, banned
    banned = _padded([[1, 3] if i % 3 else [] for i in range(n)], vocab)
    temperature = [0.0 if i % 5 == 0 else 1.0 for i in range(n)]
    sb = make_batch(n, vocab, temperature=temperature, banned_ids=banned)
    ids = sample(logits, sb).token_ids
    rows_banned = torch.arange(n) % 3 != 0
    assert not bool(torch.isin(ids[rows_banned], torch.tensor([1, 3])).any())
    assert torch.unique(ids[rows_banned]).numel() == vocab - 2
    assert bool((ids[~rows_banned & (torch.arange(n) % 5 == 0)] == 3).all())  # greedy, unbanned


def test_logprobs_are_of_the_raw_logits() -> None:
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(4, 30, generator=gen)
    pen = Penalties(
        repetition=torch.full((4,), 2.0),
        presence=torch.full((4,), 1.0),
        frequency=torch.zeros(4),
        seen_ids=torch.tensor([[0, 1, 2]] * 4),
        output_ids=torch.tensor([[0, 1, 2]] * 4),
    )
    sb = make_batch(
        4, 30, temperature=0.5, top_k=3, penalties=pen, want_logprobs=True, top_logprobs=5
    )
    out = sample(logits, sb)
    raw = torch.log_softmax(logits, -1)
    assert out.logprobs is not None and out.top_ids is not None and out.top_logprobs is not None
    assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1), atol=1e-6)
    assert_close(out.top_logprobs, raw.topk(5).values, atol=1e-6)
    assert torch.equal(out.top_ids, raw.topk(5).indices)


# ----- SamplingParams.validate -------------------------------------------------------------

VOCAB = 100

INVALID: list[tuple[dict[str, Any], str]] = [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": math.nan}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3.0}, "frequency_penalty"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 4, "min_new_tokens": 5}, "min_new_tokens"),
    ({"min_new_tokens": -1}, "min_new_tokens"),
    ({"top_logprobs": VOCAB + 1}, "top_logprobs"),
    ({"top_logprobs": -1}, "top_logprobs"),
    ({"stop_token_ids": [3, VOCAB]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
]


@pytest.mark.parametrize(
    ("kwargs", "field"), INVALID, ids=[f"{f}={next(iter(k.values()))!r}" for k, f in INVALID]
)
def test_validate_rejects_and_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs).validate(VOCAB)
    assert re.search(rf"\b{field}\b", str(info.value)), str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "min_p": 1.0},
        {"top_k": 0, "min_p": 0.0, "top_p": 1e-6},
        {"max_new_tokens": 1, "min_new_tokens": 1},
        {"top_logprobs": VOCAB, "stop_token_ids": [0, VOCAB - 1], "stop": ["x"]},
        {"seed": 0},
        {"seed": 2**63 - 1, "presence_penalty": -2.0, "frequency_penalty": 2.0},
    ],
)
def test_validate_accepts_boundary_values(kwargs: dict[str, Any]) -> None:
    SamplingParams(**kwargs).validate(VOCAB)


# ----- end to end through LLM --------------------------------------------------------------

# minisgl and transformers both compute in float32 here; they differ only by rounding.
LOGPROB_ATOL = 1e-4
PROMPTS = ["The quick brown fox", "Hello", "Once upon a time, in a land far away,"]


@pytest.fixture(scope="module")
def llama_dir(checkpoints: dict[str, Path]) -> Path:
    return checkpoints["llama"]


@pytest.fixture(scope="module", params=["off", "on"], ids=["sync", "overlap"])
def llm(llama_dir: Path, request: pytest.FixtureRequest) -> Iterator[LLM]:
    """With and without overlap scheduling: penalties and bans then see the newest output
    token only as a placeholder on the host, resolved on the device."""
    engine = LLM(
        str(llama_dir),
        num_pages=48,
        max_model_len=128,
        overlap_schedule=request.param,
        progress=False,
    )
    yield engine
    assert_idle(engine)


@pytest.fixture(scope="module")
def hf_model(llama_dir: Path) -> Any:
    return load_hf(llama_dir)


def hf_logprobs(hf: Any, out: RequestOutput) -> torch.Tensor:
    """Teacher-forced log_softmax of the reference logits at each generated position."""
    ids = out.prompt_token_ids + out.token_ids[:-1]
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[len(out.prompt_token_ids) - 1 :], dim=-1)


def seeded(seed: int | None, **kw: Any) -> SamplingParams:
    """Random sampling (temperature 1 unless given), 10 tokens, no early stop."""
    options: dict[str, Any] = {"temperature": 1.0, "max_new_tokens": 10, "ignore_eos": True}
    return SamplingParams(seed=seed, **(options | kw))


def test_same_seed_same_tokens_alone_and_in_any_batch(llm: LLM) -> None:
    params = seeded(1234, top_p=0.95)
    alone = llm.generate(PROMPTS[0], params)[0].token_ids
    assert len(alone) == 10
    assert llm.generate(PROMPTS[0], params)[0].token_ids == alone
    others = [
        (PROMPTS[1], seeded(7)),
        (PROMPTS[2], SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)),
        (PROMPTS[1], seeded(1234, top_k=5)),
        (PROMPTS[2], seeded(None, temperature=0.7, min_p=0.1, repetition_penalty=1.2)),
    ]
    for position in (0, 2, 4):
        batch = list(others)
        batch.insert(position, (PROMPTS[0], params))
        outs = llm.generate([p for p, _ in batch], [s for _, s in batch])
        assert outs[position].token_ids == alone, f"at position {position} of the batch"
    assert_idle(llm)


def test_tiny_temperatures_give_the_greedy_tokens(llm: LLM) -> None:
    """Temperatures 1e-40 and 1e-8 (valid: > 0) give exactly the greedy tokens, also in a
    batch with sampled requests, which keep their seeded tokens."""
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    expected = [o.token_ids for o in llm.generate(PROMPTS, greedy)]
    sampled = seeded(4321, temperature=0.9)
    alone = llm.generate(PROMPTS[1], sampled)[0].token_ids
    for t in (1e-40, 1e-8):
        tiny = SamplingParams(temperature=t, max_new_tokens=10, ignore_eos=True)
        assert [o.token_ids for o in llm.generate(PROMPTS, tiny)] == expected, t
        outs = llm.generate([*PROMPTS, PROMPTS[1]], [tiny, sampled, tiny, sampled])
        assert [o.token_ids for o in outs] == [expected[0], alone, expected[2], alone], t
    assert_idle(llm)


def test_different_seeds_give_different_tokens(llm: LLM) -> None:
    outs = llm.generate([PROMPTS[0]] * 4, [seeded(s) for s in (1, 2, 3, 4)])
    sequences = {tuple(o.token_ids) for o in outs}
    assert len(sequences) == 4


def test_sampling_without_seed_works(llm: LLM) -> None:
    params = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=6, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    vocab = llm.scheduler.vocab_size
    for out in outs:
        assert len(out.token_ids) == 6 and out.finish_reason == "length"
        assert all(0 <= t < vocab for t in out.token_ids)
        assert isinstance(out.text, str)


def test_logprobs_match_the_reference_model(llm: LLM, hf_model: Any) -> None:
    """Returned logprobs equal log_softmax of the HF model's float32 logits (LOGPROB_ATOL)."""
    params = [
        SamplingParams(
            temperature=0.0, max_new_tokens=8, ignore_eos=True, logprobs=True, top_logprobs=5
        ),
        seeded(99, logprobs=True, top_logprobs=20),
        seeded(5, top_p=0.5, logprobs=True, top_logprobs=3),
        # Logprobs are of the raw model: temperature and penalties do not change them.
        seeded(11, temperature=0.5, repetition_penalty=1.5, logprobs=True, top_logprobs=4),
        seeded(6, top_logprobs=2),  # top-N without per-token logprobs
        seeded(7),  # nothing asked
    ]
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[1]]
    outs = llm.generate(prompts, params)
    chosen_in_top = 0
    for out, p in zip(outs, params, strict=True):
        if not p.logprobs:
            assert out.logprobs is None
        if not p.top_logprobs:
            assert out.top_logprobs is None
        if not (p.logprobs or p.top_logprobs):
            continue
        ref = hf_logprobs(hf_model, out)
        chosen = ref.gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
        if p.logprobs:
            assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
            assert_close(torch.tensor(out.logprobs), chosen, atol=LOGPROB_ATOL)
        assert out.top_logprobs is not None and len(out.top_logprobs) == len(out.token_ids)
        for step, (token, top) in enumerate(zip(out.token_ids, out.top_logprobs, strict=True)):
            assert len(top) == p.top_logprobs
            ids = [t for t, _ in top]
            values = [v for _, v in top]
            assert values == sorted(values, reverse=True)
            assert len(set(ids)) == len(ids)
            ref_values = ref[step, ids]
            assert_close(torch.tensor(values), ref_values, atol=LOGPROB_ATOL)
            # They are the N largest: nothing outside the list beats the smallest one.
            rest = ref[step].clone()
            rest[ids] = -math.inf
            assert float(rest.max()) <= values[-1] + LOGPROB_ATOL
            if token in ids:
                chosen_in_top += 1
                if p.logprobs:
                    assert out.logprobs is not None
                    assert values[ids.index(token)] == pytest.approx(out.logprobs[step], abs=1e-6)
            if p.greedy:
                assert ids[0] == token
    assert chosen_in_top >= 8  # at least the greedy request's tokens were checked


def _hand_penalised_greedy_ok(
    ref_logits: torch.Tensor, out: RequestOutput, params: SamplingParams
) -> None:
    prompt = out.prompt_token_ids
    for step, token in enumerate(out.token_ids):
        so_far = out.token_ids[:step]
        row = _expected_penalised(
            ref_logits[step].tolist(),
            prompt,
            so_far,
            params.repetition_penalty,
            params.presence_penalty,
            params.frequency_penalty,
        )
        top = torch.tensor(row).topk(2)
        if float(top.values[0] - top.values[1]) > 1e-3:
            assert token == int(top.indices[0]), f"step {step}"
        else:  # a near tie: either is acceptable
            assert token in top.indices.tolist(), f"step {step}"


def test_penalties_end_to_end_match_hand_computed_greedy(llm: LLM, hf_model: Any) -> None:
    """Greedy decoding with penalties picks the argmax of the HF logits penalised by hand."""
    greedy: dict[str, Any] = {"temperature": 0.0, "max_new_tokens": 10, "ignore_eos": True}
    # A prompt whose greedy continuation repeats one of its own tokens, so that the
    # repetition penalty on the prompt (not only on the output) decides the first step.
    warmup = llm.generate(PROMPTS[1], SamplingParams(**greedy))[0]
    prompt = warmup.prompt_token_ids + warmup.token_ids[:4]
    params = [
        SamplingParams(**greedy),
        SamplingParams(**greedy, repetition_penalty=1.3),
        SamplingParams(**greedy, presence_penalty=0.5, frequency_penalty=0.4),
        SamplingParams(
            **greedy, repetition_penalty=0.9, presence_penalty=-0.3, frequency_penalty=0.7
        ),
    ]
    outs = llm.generate([prompt] * len(params), params)
    plain = outs[0].token_ids
    assert plain[0] in prompt  # the precondition for the prompt-penalty check below
    assert outs[1].token_ids[0] != plain[0]  # repetition penalty applies to prompt tokens
    assert all(out.token_ids != plain for out in outs[1:])  # every penalty had an effect
    for out, p in zip(outs, params, strict=True):
        ids = out.prompt_token_ids + out.token_ids[:-1]
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0].float()
        _hand_penalised_greedy_ok(logits[len(out.prompt_token_ids) - 1 :], out, p)


def test_min_new_tokens_bans_stop_tokens(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    first = llm.generate(PROMPTS[1], greedy)[0].token_ids[0]
    stop_first = SamplingParams(
        temperature=0.0, max_new_tokens=8, ignore_eos=True, stop_token_ids=[first]
    )
    stopped = llm.generate(PROMPTS[1], stop_first)[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop"
    for temperature in (0.0, 1.0):
        params = SamplingParams(
            temperature=temperature,
            seed=3,
            max_new_tokens=8,
            min_new_tokens=4,
            stop_token_ids=[first],
            ignore_eos=True,
        )
        out = llm.generate(PROMPTS[1], params)[0]
        assert first not in out.token_ids[:4]
        assert len(out.token_ids) >= 4
        if first in out.token_ids:
            assert out.token_ids[-1] == first and out.finish_reason == "stop"


# ----- invalid requests leave the engine usable --------------------------------------------


@pytest.mark.parametrize(
    "prompts",
    [
        "",
        [[]],
        [[5, 2048]],
        [[-1, 5]],
        [list(range(10, 138))],  # exactly max_model_len (128) tokens
        ["a fine prompt", [7, 99999]],  # the first is queued, then withdrawn
    ],
    ids=["empty-text", "empty-ids", "id-too-large", "id-negative", "too-long", "second-bad"],
)
def test_invalid_prompt_raises_and_engine_recovers(llm: LLM, prompts: Any) -> None:
    with pytest.raises(ValueError, match=r"\bprompt\b"):
        llm.generate(prompts, SamplingParams(max_new_tokens=2))
    assert_idle(llm)
    out = llm.generate("still works", SamplingParams(temperature=0.0, max_new_tokens=3))[0]
    assert 1 <= len(out.token_ids) <= 3
    assert_idle(llm)


def test_longest_allowed_prompt_still_generates(llm: LLM) -> None:
    out = llm.generate([list(range(10, 137))], SamplingParams(max_new_tokens=5))[0]
    assert len(out.token_ids) == 1 and out.finish_reason == "length"
    assert_idle(llm)


def test_invalid_sampling_params_through_llm(llm: LLM) -> None:
    with pytest.raises(ValueError, match=r"\btop_logprobs\b"):
        llm.generate(PROMPTS[0], SamplingParams(top_logprobs=llm.scheduler.vocab_size + 1))
    with pytest.raises(ValueError, match=r"\bsampling_params\b"):
        llm.generate(PROMPTS[:2], [SamplingParams()])
    assert_idle(llm)
