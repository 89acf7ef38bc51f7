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


@jit
def _norm_rope(  # type: ignore[no-untyped-def]
    ptr, mask, W, cos, sin, eps, d, HALF: tl.constexpr, HAS_NORM: tl.constexpr
):
    """Heads [BLOCK_H, 2 * HALF] at ptr: RMSNorm per head (weight W) if HAS_NORM, then the
    NeoX rotation; returns the two rotated halves in float32."""
    x1 = tl.load(ptr, mask=mask, other=0.0)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0)
    if HAS_NORM:  # as _rmsnorm_kernel: float32 statistics, the weight applied in x's dtype
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        ms = (tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)) / (2 * HALF)
        r = tl.rsqrt(ms + eps)[:, None]
        x1 = tl.load(W + d)[None, :] * (f1 * r).to(x1.dtype)
        x2 = tl.load(W + HALF + d)[None, :] * (f2 * r).to(x2.dtype)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    return f1 * cos - f2 * sin, f2 * cos + f1 * sin


@jit
def _to_cache(x, scale, FP8: tl.constexpr, DTYPE: tl.constexpr):  # type: ignore[no-untyped-def]
    """A value as the cache stores it: FP8 as store_kv_fp8 quantises (x / scale, saturated)."""
    if FP8:
        x = tl.math.div_rn(x.to(tl.float32), scale)
        x = tl.clamp(x, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
    return x.to(DTYPE)


@jit
def _qkv_rope_store_kernel(  # type: ignore[no-untyped-def]
    QKV,
    POS,
    COS_SIN,
    QW,
    KW,
    Q_OUT,
    KCache,
    VCache,
    Slots,
    stride_t,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    n_q,
    n_kv,
    eps,
    k_scale,
    v_scale,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_NORM: tl.constexpr,
    FP8: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t).to(tl.int64)
    slot = tl.load(Slots + t).to(tl.int64)
    d = tl.arange(0, HALF)
    cos = tl.load(COS_SIN + pos * (2 * HALF) + d)[None, :]
    sin = tl.load(COS_SIN + pos * (2 * HALF) + HALF + d)[None, :]
    h = tl.arange(0, BLOCK_H)[:, None]
    head = h * (2 * HALF) + d[None, :]  # element offsets of heads in a packed [H, D] row
    row = QKV + t * stride_t
    dtype = Q_OUT.dtype.element_ty
    cache_dtype = KCache.dtype.element_ty

    mask = h < n_q
    q1, q2 = _norm_rope(row + head, mask, QW, cos, sin, eps, d, HALF, HAS_NORM)
    q_out = Q_OUT + t * n_q * (2 * HALF) + head
    tl.store(q_out, q1.to(dtype), mask=mask)
    tl.store(q_out + HALF, q2.to(dtype), mask=mask)

    mask = h < n_kv
    k1, k2 = _norm_rope(row + n_q * (2 * HALF) + head, mask, KW, cos, sin, eps, d, HALF, HAS_NORM)
    k_dst = KCache + slot * stride_ks + h * stride_kh + d[None, :]
    tl.store(k_dst, _to_cache(k1.to(dtype), k_scale, FP8, cache_dtype), mask=mask)
    tl.store(k_dst + HALF, _to_cache(k2.to(dtype), k_scale, FP8, cache_dtype), mask=mask)

    v_src = row + (n_q + n_kv) * (2 * HALF) + head
    v_dst = VCache + slot * stride_vs + h * stride_vh + d[None, :]
    for part in tl.static_range(2):
        v = tl.load(v_src + part * HALF, mask=mask, other=0.0)
        tl.store(v_dst + part * HALF, _to_cache(v, v_scale, FP8, cache_dtype), mask=mask)


def qkv_rope_store(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    eps: float,
    num_q_heads: int,
    num_kv_heads: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out_slots: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """The attention block's input side in one launch, grid (token,).

    qkv: [T, (Hq + 2 Hkv) D], the fused projection's output (q heads, then k, then v). Each q
    and k head gets its RMSNorm (q_norm / k_norm weights, Qwen3; both or neither) and the
    rotation by its token's position; the new K and V rows go straight into their cache slots
    (an FP8 cache: divided by k_scale / v_scale, saturated at +-448). Returns q [T, Hq, D],
    contiguous, in qkv's dtype."""
    tokens = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    assert qkv.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert qkv.shape[1] == (num_q_heads + 2 * num_kv_heads) * head_dim
    assert (q_norm is None) == (k_norm is None)
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    assert fp8 or k_cache.dtype == qkv.dtype, "the cache is in the model's dtype or FP8"
    q = torch.empty(tokens, num_q_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if tokens == 0:
        return q
    has_norm = q_norm is not None
    _qkv_rope_store_kernel[(tokens,)](
        qkv, positions, cos_sin, q_norm if has_norm else qkv, k_norm if has_norm else qkv, q,
        k_cache, v_cache, out_slots, qkv.stride(0), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), num_q_heads, num_kv_heads, eps, k_scale, v_scale,
        HALF=head_dim // 2, BLOCK_H=int(triton.next_power_of_2(max(num_q_heads, num_kv_heads))),
        HAS_NORM=has_norm, FP8=fp8, num_warps=4,
    )  # fmt: skip
    return q
