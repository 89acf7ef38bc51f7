"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minisgl.kernels import gpu_kernels


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2*I] (gate then up) -> silu(gate) * up, [..., I]."""
    fused = gpu_kernels(gate_up, "fused")
    if fused is not None and gate_up.dim() == 2:
        out: torch.Tensor = fused.silu_and_mul(gate_up)
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
