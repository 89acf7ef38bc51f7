"""The fused sampling kernel against the torch sampler, on CPU through the Triton interpreter.

The interpreter runs each row as a Python program, so the many-draw frequency check lives in
tests/gpu/test_fused_gpu.py; here the kernel must pick the same token as the torch sampler's
exponential race, whose frequencies tests/engine/test_sampling.py checks."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from types import ModuleType

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from minisgl.engine.sampler import filtered_probs, row_hash, uniform_noise
from tests.helpers.sampling_batch import make_batch


@pytest.fixture(scope="module")
def k() -> Iterator[ModuleType]:
    os.environ["TRITON_INTERPRET"] = "1"
    from minisgl.kernels import sampling

    if type(sampling._sample_kernel).__name__ != "InterpretedFunction":
        sampling = importlib.reload(sampling)
    yield sampling


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


def test_masked_tokens_are_never_chosen(k: ModuleType) -> None:
    logits = torch.zeros(200, 50)
    logits[:, 7] = float("-inf")
    got = k.sample_rows(
        logits, torch.ones(200), row_hash(torch.arange(200), torch.zeros(200, dtype=torch.int64))
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


def test_the_typed_op_runs_the_kernel_only_on_the_gpu_path(
    k: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """minisgl.kernels.fused_sample_rows: None for a CPU tensor (the sampler's torch path), the
    kernel's tokens when the gate to the GPU path is open (forced here: the interpreter)."""
    import minisgl.kernels as ops

    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(4))
    temp = torch.tensor([0.0, 0.5, 1.0, 0.0, 2.0, 0.7])
    hashes = row_hash(torch.arange(6), torch.zeros(6, dtype=torch.int64))
    assert ops.fused_sample_rows(logits, temp, hashes) is None
    monkeypatch.setattr(ops, "_on_gpu", lambda t: True)
    got = ops.fused_sample_rows(logits, temp, hashes)
    assert got is not None and torch.equal(got, k.sample_rows(logits, temp, hashes))
