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

from tests.helpers.fused_cases import (
    check_qkv_rope_store,
    check_rmsnorm,
    check_rotary,
    check_silu,
)

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


def test_the_layers_reach_each_kernel_only_on_the_gpu_path(
    k: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The typed ops in minisgl.kernels run a kernel when the gate to the GPU path is open (here
    forced open: the interpreter runs the kernels on CPU) and return None when it is closed (a
    CPU tensor), so the layers fall back to torch; both give the same results."""
    import minisgl.kernels as ops
    from minisgl.layers.activation import silu_and_mul
    from minisgl.layers.norm import RMSNorm
    from minisgl.layers.rope_config import RopeConfig
    from minisgl.layers.rotary import RotaryEmbedding

    calls: list[str] = []
    for name in ("rmsnorm", "add_rmsnorm", "rotary_", "silu_and_mul"):
        real = getattr(k, name)

        def counted(*args: object, _real: object = real, _name: str = name) -> object:
            calls.append(_name)
            return _real(*args)  # type: ignore[operator]

        monkeypatch.setattr(k, name, counted)
    gen = torch.Generator().manual_seed(3)
    x, res = torch.randn(4, 32, generator=gen), torch.randn(4, 32, generator=gen)
    norm = RMSNorm(32, 1e-6)
    rope_cfg = RopeConfig(theta=10000.0)
    rope = RotaryEmbedding(16, rope_cfg, 64)
    q, kk = torch.randn(4, 2, 16, generator=gen), torch.randn(4, 1, 16, generator=gen)
    pos = torch.tensor([0, 5, 9, 63])

    def run() -> list[torch.Tensor]:
        rq, rk = rope(pos, q.clone(), kk.clone())
        return [norm(x), *norm.add_and_norm(x, res), rq, rk, silu_and_mul(res)]

    torch_path = run()
    assert calls == [], "a CPU tensor took the kernel path"
    monkeypatch.setattr(ops, "_on_gpu", lambda t: True)
    fused_path = run()
    assert sorted(calls) == ["add_rmsnorm", "rmsnorm", "rotary_", "silu_and_mul"]
    for a, b in zip(fused_path, torch_path, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert ops.fused_silu_and_mul(res[None]) is None  # 3-D input: the torch path
    # fused=False (--disable-fused-kernels): the torch path even with the gate open.
    calls.clear()
    norm, rope = RMSNorm(32, 1e-6, fused=False), RotaryEmbedding(16, rope_cfg, 64, fused=False)
    rq, rk = rope(pos, q.clone(), kk.clone())
    unfused = [norm(x), *norm.add_and_norm(x, res), rq, rk, silu_and_mul(res, fused=False)]
    assert calls == []
    for a, b in zip(unfused, torch_path, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_norm", [True, False])
@pytest.mark.parametrize(("tokens", "heads"), [(1, (2, 1, 16)), (5, (4, 2, 32)), (3, (3, 3, 64))])
def test_qkv_rope_store(
    k: ModuleType, dtype: torch.dtype, has_norm: bool, tokens: int, heads: tuple[int, int, int]
) -> None:
    check_qkv_rope_store(k, "cpu", dtype, tokens, heads, has_norm)
