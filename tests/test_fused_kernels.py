"""The fused Triton kernels against torch on CPU through the Triton interpreter (fp32/fp16)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from types import ModuleType

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from tests.fused_cases import check_rmsnorm, check_rotary, check_silu

DTYPES = [torch.float32, torch.float16]


@pytest.fixture(scope="module")
def k() -> Iterator[ModuleType]:
    os.environ["TRITON_INTERPRET"] = "1"
    from minisgl.kernels import fused

    if type(fused._rmsnorm_kernel).__name__ != "InterpretedFunction":
        fused = importlib.reload(fused)
    yield fused


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "n"), [(1, 64), (5, 96), (3, 100)])
def test_rmsnorm(k: ModuleType, dtype: torch.dtype, rows: int, n: int) -> None:
    check_rmsnorm(k, "cpu", dtype, rows, n)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "dim"), [(1, 16), (7, 32)])
def test_rotary(k: ModuleType, dtype: torch.dtype, tokens: int, dim: int) -> None:
    check_rotary(k, "cpu", dtype, tokens, dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "inter"), [(1, 40), (4, 1500)])
def test_silu_and_mul(k: ModuleType, dtype: torch.dtype, rows: int, inter: int) -> None:
    check_silu(k, "cpu", dtype, rows, inter)
