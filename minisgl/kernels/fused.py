"""Fused elementwise Triton kernels for the decoder's small ops (GPU path).

In a decode step these ops touch a few KB each, so their cost is the launch, not the
bytes: one kernel instead of the five to ten that the torch versions launch. Each matches
its torch counterpart in minisgl.layers (float32 math, cast back to the input dtype).

- rmsnorm / add_rmsnorm: y = w * (x / rms(x)) with the residual add fused in.
- rotary: NeoX-style rotation of q and k in place, from a [max_pos, D] cos|sin table.
- silu_and_mul: silu(gate) * up over a [T, 2I] input.

Importing this module imports triton; the CPU path never imports it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minisgl.kernels.jit import jit


@jit
def _rmsnorm_kernel(  # type: ignore[no-untyped-def]
    X,
    R,
    W,
    Y,
    R_OUT,
    stride_x,
    stride_r,
    stride_y,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        tl.store(R_OUT + row * n_cols + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    w = tl.load(W + cols, mask=mask, other=0.0)
    y = w * (xf * rms).to(x.dtype)
    tl.store(Y + row * stride_y + cols, y, mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x ([..., N]); returns a new contiguous tensor."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    n = x2.shape[1]
    _rmsnorm_kernel[(x2.shape[0],)](
        x2, x2, weight, out, out, x2.stride(0), 0, out.stride(0), n, eps,
        HAS_RESIDUAL=False, BLOCK=triton.next_power_of_2(n),
    )  # fmt: skip
    return out.view(x.shape)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual), x + residual) for [T, N] inputs, in one kernel."""
    assert x.shape == residual.shape and x.dim() == 2
    out = torch.empty_like(x)
    summed = torch.empty_like(x)
    n = x.shape[1]
    _rmsnorm_kernel[(x.shape[0],)](
        x, residual, weight, out, summed, x.stride(0), residual.stride(0), out.stride(0), n, eps,
        HAS_RESIDUAL=True, BLOCK=triton.next_power_of_2(n),
    )  # fmt: skip
    return out, summed


@jit
def _rotary_kernel(  # type: ignore[no-untyped-def]
    Q,
    K,
    POS,
    COS_SIN,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    n_q_heads,
    n_k_heads,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t).to(tl.int64)
    d = tl.arange(0, HALF)
    cos = tl.load(COS_SIN + pos * (2 * HALF) + d)[None, :]
    sin = tl.load(COS_SIN + pos * (2 * HALF) + HALF + d)[None, :]
    h = tl.arange(0, BLOCK_H)[:, None]
    for which in tl.static_range(2):
        if which == 0:
            base, sh, nh = Q + t * stride_qt, stride_qh, n_q_heads
        else:
            base, sh, nh = K + t * stride_kt, stride_kh, n_k_heads
        mask = h < nh
        p1 = base + h * sh + d[None, :]
        x1 = tl.load(p1, mask=mask, other=0.0)
        x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        tl.store(p1, (f1 * cos - f2 * sin).to(x1.dtype), mask=mask)
        tl.store(p1 + HALF, (f2 * cos + f1 * sin).to(x1.dtype), mask=mask)


def rotary_(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> None:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place (last dims contiguous)."""
    assert q.stride(-1) == 1 and k.stride(-1) == 1
    t, hq, dim = q.shape
    if t == 0:
        return
    _rotary_kernel[(t,)](
        q, k, positions, cos_sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        hq, k.shape[1], HALF=dim // 2, BLOCK_H=triton.next_power_of_2(max(hq, k.shape[1])),
    )  # fmt: skip


@jit
def _silu_mul_kernel(X, Y, n_cols, stride_x, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    y = (gate / (1.0 + tl.exp(-gate))).to(up.dtype) * up
    tl.store(Y + row * n_cols + cols, y, mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> silu(gate) * up, [T, I]."""
    t, two_i = gate_up.shape
    n = two_i // 2
    out = torch.empty(t, n, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, n, gate_up.stride(0), BLOCK=block)
    return out
