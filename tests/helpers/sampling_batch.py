"""A SamplingBatch built the way the scheduler builds one, from per-row values or one value for
every row (the sampler tests and the fused sampling kernel's tests share it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from minisgl.engine.sampler import Penalties, SamplingBatch
from minisgl.sampling_params import GREEDY_TEMPERATURE

FloatArg = float | Sequence[float]
IntArg = int | Sequence[int]


def _column(value: Any, n: int, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(dtype)
    if isinstance(value, (int, float)):
        return torch.full((n,), value, dtype=dtype)
    assert len(value) == n
    return torch.tensor(list(value), dtype=dtype)


def make_batch(
    n: int,
    vocab: int,
    *,
    temperature: FloatArg = 1.0,
    top_k: IntArg = -1,
    top_p: FloatArg = 1.0,
    min_p: FloatArg = 0.0,
    seeds: IntArg | torch.Tensor | None = None,
    steps: IntArg | torch.Tensor = 0,
    penalties: Penalties | None = None,
    banned_ids: torch.Tensor | None = None,
    want_logprobs: bool = False,
    top_logprobs: int = 0,
) -> SamplingBatch:
    """A SamplingBatch of `n` rows built the way the scheduler builds one (top_k <= 0: off)."""
    temp = _column(temperature, n, torch.float32)
    k = _column(top_k, n, torch.int64)
    p = _column(top_p, n, torch.float32)
    mp = _column(min_p, n, torch.float32)
    sampled = temp >= GREEDY_TEMPERATURE
    return SamplingBatch(
        temperature=temp,
        top_k=torch.where(k > 0, k, vocab),
        top_p=p,
        min_p=mp,
        seeds=_column(torch.arange(n) if seeds is None else seeds, n, torch.int64),
        steps=_column(steps, n, torch.int64),
        all_greedy=bool((~sampled).all()),
        use_top_k=bool(((k > 0) & (k < vocab) & sampled).any()),
        use_top_p=bool(((p < 1.0) & sampled).any()),
        use_min_p=bool(((mp > 0.0) & sampled).any()),
        penalties=penalties,
        banned_ids=banned_ids,
        want_logprobs=want_logprobs,
        top_logprobs=top_logprobs,
    )
