"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minisgl.kernels import fused_silu_and_mul


def silu_and_mul(gate_up: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """[..., 2*I] (gate then up) -> silu(gate) * up, [..., I]; one Triton kernel on the GPU
    unless `fused` is False."""
    out = fused_silu_and_mul(gate_up) if fused else None
    if out is not None:
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
