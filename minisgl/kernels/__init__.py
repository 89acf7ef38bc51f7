"""Triton kernels (GPU path). Importing this package does not import triton; its modules do.

The layers and the sampler call the fused ops through the typed functions below: each runs
its Triton kernel when the input is on a CUDA device and triton imports, and returns None
otherwise (or when the kernel does not cover the input), leaving the torch path to the caller.
The kernel modules are imported on the first call that uses them, never on the CPU path.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported (checked once)."""
    return importlib.util.find_spec("triton") is not None


def _on_gpu(x: torch.Tensor) -> bool:
    return x.is_cuda and triton_available()


def fused_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm over the last dim of x in one kernel; None off the GPU path."""
    if not _on_gpu(x):
        return None
    from minisgl.kernels import fused

    return fused.rmsnorm(x, weight, eps)


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rmsnorm(x + residual), x + residual) in one kernel; None off the GPU path."""
    if not _on_gpu(x):
        return None
    from minisgl.kernels import fused

    return fused.add_rmsnorm(x, residual, weight, eps)


def fused_rotary_(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place and return them; None off the GPU path
    (q and k untouched)."""
    if not _on_gpu(q):
        return None
    from minisgl.kernels import fused

    fused.rotary_(positions, q, k, cos_sin)
    return q, k


def fused_qkv_rope_store(
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
    k_scale: float,
    v_scale: float,
) -> torch.Tensor | None:
    """From the fused projection's output qkv [T, (Hq + 2 Hkv) D]: per-head q/k RMSNorm (when
    the weights are given), rotary, and the new K/V stored in their cache slots, in one kernel;
    returns q [T, Hq, D]. None off the GPU path, or when the head dim is not a power of two of
    at least 16 or the cache is neither in qkv's dtype nor FP8 (nothing is written then)."""
    import torch

    head_dim = k_cache.shape[-1]
    if not _on_gpu(qkv) or qkv.dim() != 2 or head_dim < 16 or head_dim & (head_dim - 1):
        return None
    if k_cache.dtype not in (qkv.dtype, torch.float8_e4m3fn):
        return None
    from minisgl.kernels import fused

    return fused.qkv_rope_store(
        qkv, positions, cos_sin, q_norm, k_norm, eps, num_q_heads, num_kv_heads,
        k_cache, v_cache, out_slots, k_scale, v_scale,
    )  # fmt: skip


def fused_silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """[T, 2I] -> silu(gate) * up, [T, I], in one kernel; None off the GPU path or when the
    input is not 2-D."""
    if not _on_gpu(gate_up) or gate_up.dim() != 2:
        return None
    from minisgl.kernels import fused

    return fused.silu_and_mul(gate_up)


def fused_moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    renormalize: bool,
) -> torch.Tensor | None:
    """Sparse mixture of experts for x [T, H] in Triton (routing, then the gate_up and down
    GEMMs grouped by expert; see minisgl.kernels.moe): the sum over each token's top-k experts
    (softmax of router_logits [T, E], renormalised if asked) of weight * down(silu(gate) * up),
    with gate_up [E, 2I, H] and down [E, H, I]. [T, H] in x's dtype; None off the GPU path or
    for a 3-D input."""
    if not _on_gpu(x) or x.dim() != 2:
        return None
    from minisgl.kernels import moe

    return moe.fused_moe(x, router_logits, gate_up, down, top_k, renormalize)


def fused_sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    *,
    min_p: torch.Tensor | None = None,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    max_top_k: int | None = None,
) -> torch.Tensor | None:
    """One token per row of logits [B, V], split over the vocabulary: greedy rows take the
    argmax, others race with the sampler's noise of (seeds, steps) over the tokens min-p
    (min_p given), top-k and top-p (top_k / top_p given) keep; max_top_k, when known, bounds
    top_k of the rows with top-k or top-p on (vocab for top-p alone). None off the GPU path."""
    if not _on_gpu(logits):
        return None
    from minisgl.kernels import sampling

    return sampling.sample(
        logits,
        temperature,
        seeds,
        steps,
        min_p=min_p,
        top_k=top_k,
        top_p=top_p,
        max_top_k=max_top_k,
    )
