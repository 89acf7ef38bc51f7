"""The fused Triton kernels against torch on CUDA, bf16 included (`pytest -m gpu`)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from minisgl.engine.sampler import row_hash
from tests.helpers.fused_cases import (
    check_qkv_rope_store,
    check_rmsnorm,
    check_rotary,
    check_silu,
)

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(scope="module")
def k() -> Iterator[ModuleType]:
    assert torch.cuda.is_available(), "the gpu tests need a CUDA GPU"
    os.environ.pop("TRITON_INTERPRET", None)
    from minisgl.kernels import fused

    if type(fused._rmsnorm_kernel).__name__ == "InterpretedFunction":
        fused = importlib.reload(fused)
    yield fused


@pytest.fixture(scope="module")
def sampling() -> Iterator[ModuleType]:
    os.environ.pop("TRITON_INTERPRET", None)
    from minisgl.kernels import sampling

    if type(sampling._sample_kernel).__name__ == "InterpretedFunction":
        sampling = importlib.reload(sampling)
    yield sampling


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "n"), [(1, 4096), (300, 5120), (7, 128), (64, 1024)])
def test_rmsnorm(k: ModuleType, dtype: torch.dtype, rows: int, n: int) -> None:
    check_rmsnorm(k, "cuda", dtype, rows, n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "dim"), [(1, 128), (333, 128), (9, 64), (4, 256)])
def test_rotary(k: ModuleType, dtype: torch.dtype, tokens: int, dim: int) -> None:
    check_rotary(k, "cuda", dtype, tokens, dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "inter"), [(1, 14336), (257, 3072)])
def test_silu_and_mul(k: ModuleType, dtype: torch.dtype, rows: int, inter: int) -> None:
    check_silu(k, "cuda", dtype, rows, inter)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_norm", [True, False])
@pytest.mark.parametrize(
    ("tokens", "heads"),
    [
        (1, (16, 8, 128)),
        (256, (32, 8, 128)),
        (8192, (16, 8, 128)),
        (7, (14, 2, 64)),
        (3, (40, 8, 128)),
    ],
)
def test_qkv_rope_store(
    k: ModuleType, dtype: torch.dtype, has_norm: bool, tokens: int, heads: tuple[int, int, int]
) -> None:
    check_qkv_rope_store(k, "cuda", dtype, tokens, heads, has_norm)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("tokens", "heads"), [(1, (16, 8, 128)), (300, (32, 8, 128))])
def test_qkv_rope_store_into_an_fp8_cache(
    k: ModuleType, dtype: torch.dtype, tokens: int, heads: tuple[int, int, int]
) -> None:
    check_qkv_rope_store(k, "cuda", dtype, tokens, heads, has_norm=True, fp8=True)


def test_sampling_frequencies_follow_the_distribution(sampling: ModuleType) -> None:
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    n = 100_000
    logits = probs.log().repeat(n, 1).cuda()
    seeds = torch.arange(n, dtype=torch.int64, device="cuda")
    got = sampling.sample_rows(
        logits, torch.ones(n, device="cuda"), row_hash(seeds, torch.zeros_like(seeds))
    )
    freq = torch.bincount(got, minlength=4).float().cpu() / n
    assert torch.allclose(freq, probs, atol=0.005), freq


def test_sampling_matches_the_torch_race_at_full_vocab(sampling: ModuleType) -> None:
    from minisgl.engine.sampler import uniform_noise

    rows, vocab = 64, 151_936
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = 3 * torch.randn(rows, vocab, device="cuda", generator=gen)
    temp = torch.full((rows,), 0.6, device="cuda")
    seeds = torch.arange(rows, dtype=torch.int64, device="cuda") * 104729
    steps = torch.full_like(seeds, 17)
    probs = torch.softmax(logits / 0.6, dim=-1)
    race = (probs / -torch.log(uniform_noise(seeds, steps, vocab))).argmax(-1)
    got = sampling.sample_rows(logits, temp, row_hash(seeds, steps))
    assert (got == race).float().mean().item() >= 0.98
