"""Checks of minisgl.kernels.fused against the torch layers, shared by the CPU (interpreter)
and GPU test modules. Outputs are compared with the torch path on the same inputs."""

from __future__ import annotations

from types import ModuleType

import torch

from minisgl.layers.activation import silu_and_mul
from minisgl.layers.norm import RMSNorm
from minisgl.layers.rotary import RotaryEmbedding, _rotate
from minisgl.models.config import RopeConfig

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.isfinite(a).all()
    err = (a.float() - b.float()).abs().max().item()
    scale = max(1.0, b.float().abs().max().item())
    assert err <= TOL[dtype] * scale, f"max error {err}"


def check_rmsnorm(k: ModuleType, device: str, dtype: torch.dtype, rows: int, n: int) -> None:
    gen = torch.Generator().manual_seed(rows * 31 + n)
    x = torch.randn(rows, n, generator=gen).to(device, dtype)
    res = torch.randn(rows, n, generator=gen).to(device, dtype)
    norm = RMSNorm(n, 1e-6).to(device)
    norm.weight.data = (1 + 0.1 * torch.randn(n, generator=gen)).to(device, dtype)
    # The torch reference: run the layer's math on CPU-like semantics (same device, no fusion).
    ref = _torch_rmsnorm(x, norm.weight, norm.eps)
    close(k.rmsnorm(x, norm.weight, norm.eps), ref, dtype)
    out, summed = k.add_rmsnorm(x, res, norm.weight, norm.eps)
    close(summed, x + res, dtype)
    close(out, _torch_rmsnorm(x + res, norm.weight, norm.eps), dtype)
    # Per-head norm on a strided view (Qwen3's q/k norm).
    heads = x.view(rows, -1, 16) if n % 16 == 0 else x.view(rows, 1, n)
    w = norm.weight[: heads.shape[-1]]
    close(k.rmsnorm(heads, w, 1e-6), _torch_rmsnorm(heads, w, 1e-6), dtype)


def _torch_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def check_rotary(k: ModuleType, device: str, dtype: torch.dtype, tokens: int, dim: int) -> None:
    gen = torch.Generator().manual_seed(tokens + dim)
    rope = RopeConfig(
        theta=10000.0,
        rope_type="llama3",
        factor=8.0,
        original_max_position_embeddings=64,
    )
    emb = RotaryEmbedding(dim, rope, 512).to(device)
    hq, hk = 6, 2
    qkv = torch.randn(tokens, (hq + 2 * hk) * dim, generator=gen).to(device, dtype)
    q = qkv[:, : hq * dim].view(tokens, hq, dim)  # strided views, as in the model
    kk = qkv[:, hq * dim : (hq + hk) * dim].view(tokens, hk, dim)
    pos = torch.randint(0, 512, (tokens,), generator=gen).to(device)
    cos, sin = emb.cos_sin[pos].unsqueeze(1).chunk(2, dim=-1)
    ref_q, ref_k = _rotate(q, cos, sin), _rotate(kk, cos, sin)
    v_before = qkv[:, (hq + hk) * dim :].clone()
    k.rotary_(pos, q, kk, emb.cos_sin)
    close(q, ref_q, dtype)
    close(kk, ref_k, dtype)
    assert torch.equal(qkv[:, (hq + hk) * dim :], v_before), "rotary touched v"


def check_silu(k: ModuleType, device: str, dtype: torch.dtype, rows: int, inter: int) -> None:
    gen = torch.Generator().manual_seed(rows + inter)
    x = (3 * torch.randn(rows, 2 * inter, generator=gen)).to(device, dtype)
    gate, up = x.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    close(k.silu_and_mul(x), ref, dtype)
    assert silu_and_mul is not None  # the layer function is what the model calls on CPU


def check_qkv_rope_store(
    k: ModuleType,
    device: str,
    dtype: torch.dtype,
    tokens: int,
    heads: tuple[int, int, int],
    has_norm: bool,
    fp8: bool = False,
) -> None:
    """qkv_rope_store against the unfused torch steps: q normed and rotated, K/V in exactly
    their slots of poisoned caches (every other slot untouched), FP8 caches quantised as
    quantize_fp8 does."""
    from minisgl.attention.base import FP8_DTYPE, dequantize_fp8, quantize_fp8

    hq, hkv, dim = heads
    gen = torch.Generator().manual_seed(tokens * 7 + hq + dim)
    rope = RopeConfig(theta=1e6)
    emb = RotaryEmbedding(dim, rope, 4096).to(device)
    qkv = (2 * torch.randn(tokens, (hq + 2 * hkv) * dim, generator=gen)).to(device, dtype)
    pos = torch.randint(0, 4096, (tokens,), generator=gen).to(device)
    num_slots = 2 * tokens + 3
    slots = torch.randperm(num_slots, generator=gen)[:tokens].to(device)
    q_w = k_w = None
    if has_norm:
        q_w = (1 + 0.2 * torch.randn(dim, generator=gen)).to(device, dtype)
        k_w = (1 + 0.2 * torch.randn(dim, generator=gen)).to(device, dtype)
    cache_dtype = FP8_DTYPE if fp8 else dtype
    poison = torch.full((num_slots, hkv, dim), float("nan"), device=device)
    k_cache, v_cache = poison.to(cache_dtype).clone(), poison.to(cache_dtype).clone()
    k_scale, v_scale = (0.5, 2.0) if fp8 else (1.0, 1.0)

    q_ref, k_ref, v_ref = qkv.split([hq * dim, hkv * dim, hkv * dim], dim=-1)
    q_ref, k_ref = q_ref.reshape(tokens, hq, dim), k_ref.reshape(tokens, hkv, dim)
    if q_w is not None and k_w is not None:
        q_ref, k_ref = _torch_rmsnorm(q_ref, q_w, 1e-6), _torch_rmsnorm(k_ref, k_w, 1e-6)
    cos, sin = emb.cos_sin[pos].unsqueeze(1).chunk(2, dim=-1)
    q_ref, k_ref = _rotate(q_ref, cos, sin), _rotate(k_ref, cos, sin)
    v_ref = v_ref.reshape(tokens, hkv, dim)

    q = k.qkv_rope_store(
        qkv, pos, emb.cos_sin, q_w, k_w, 1e-6, hq, hkv, k_cache, v_cache, slots, k_scale, v_scale
    )
    assert q.shape == (tokens, hq, dim) and q.is_contiguous()
    close(q, q_ref, dtype)
    if fp8:
        for cache, ref, scale in ((k_cache, k_ref, k_scale), (v_cache, v_ref, v_scale)):
            got = dequantize_fp8(cache.view(torch.uint8)[slots].view(FP8_DTYPE), scale, dtype)
            want = dequantize_fp8(quantize_fp8(ref, scale), scale, dtype)
            # One FP8 step (3 mantissa bits) where the 16-bit inputs round differently.
            err = (got.float() - want.float()).abs()
            assert (err <= 0.13 * want.float().abs() + 1e-2).all(), err.max()
    else:
        close(k_cache[slots], k_ref, dtype)
        assert torch.equal(v_cache[slots], v_ref), "v is stored as it is"
    untouched = torch.ones(num_slots, dtype=torch.bool, device=device)
    untouched[slots] = False
    for cache in (k_cache, v_cache):
        rest = cache.view(torch.uint8)[untouched] if fp8 else cache[untouched]
        expect = poison.to(cache_dtype).view(torch.uint8)[untouched] if fp8 else None
        if expect is not None:
            assert torch.equal(rest, expect), "a slot outside out_slots was written"
        else:
            assert torch.isnan(rest).all(), "a slot outside out_slots was written"
