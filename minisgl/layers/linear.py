"""Linear layers whose weights may be several checkpoint tensors stacked (fused qkv, gate_up)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MergedLinear(nn.Module):
    """y = x W^T (+ b) where W stacks several checkpoint matrices along the output dim.

    `shard_sizes` gives each part's output size, in order; a plain linear has one part.
    The loader fills parts one at a time through `load_shard`.
    """

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool) -> None:
        super().__init__()
        self.shard_sizes = shard_sizes
        out = sum(shard_sizes)
        self.weight = nn.Parameter(torch.empty(out, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def shard_slice(self, shard: int) -> slice:
        """Rows of the stacked weight that part `shard` occupies."""
        start = sum(self.shard_sizes[:shard])
        return slice(start, start + self.shard_sizes[shard])
