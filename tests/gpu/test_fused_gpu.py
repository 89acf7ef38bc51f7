"""The fused Triton kernels against torch on CUDA, bf16 included (`pytest -m gpu`)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from tests.fused_cases import check_rmsnorm, check_rotary, check_silu

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
