"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch
from torch import nn

from minisgl.kernels import fused_add_rmsnorm, fused_rmsnorm


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as the HF reference does; in one Triton
    kernel on the GPU unless `fused` is False."""

    def __init__(self, size: int, eps: float, fused: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = fused_rmsnorm(x, self.weight, self.eps) if self.fused else None
        if out is not None:
            return out
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (norm(x + residual), x + residual)."""
        pair = fused_add_rmsnorm(x, residual, self.weight, self.eps) if self.fused else None
        if pair is not None:
            return pair
        summed = x + residual
        return self.forward(summed), summed
