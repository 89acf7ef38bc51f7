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
