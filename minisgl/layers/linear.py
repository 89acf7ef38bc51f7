"""Linear layers whose weights may be several checkpoint tensors stacked (fused qkv, gate_up),
split over tensor-parallel ranks by output features (column) or input features (row)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from minisgl.distributed.group import TPGroup

Parallel = Literal["none", "column", "row"]


class MergedLinear(nn.Module):
    """y = x W^T (+ b) where W stacks several checkpoint matrices along the output dim.

    `shard_sizes` gives each part's full output size, in order; a plain linear has one part.
    With `parallel="column"` this rank holds 1/tp of every part's rows (its heads, its slice of
    the intermediate features) and outputs only those; with `"row"` it holds 1/tp of the input
    features and the partial products are summed over the ranks. The loader fills parts one at
    a time through `checkpoint_slice`.
    """

    def __init__(
        self,
        in_features: int,
        shard_sizes: list[int],
        bias: bool,
        tp: TPGroup | None = None,
        parallel: Parallel = "none",
    ) -> None:
        super().__init__()
        self.tp = tp or TPGroup()
        self.parallel = parallel
        if parallel == "column":
            shard_sizes = [self.tp.shard(n, "output features") for n in shard_sizes]
        elif parallel == "row":
            in_features = self.tp.shard(in_features, "input features")
            if bias:
                raise ValueError("a row-parallel linear cannot have a bias")
        self.shard_sizes = shard_sizes
        out = sum(shard_sizes)
        self.weight = nn.Parameter(torch.empty(out, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return self.tp.all_reduce(y) if self.parallel == "row" else y

    def shard_slice(self, shard: int) -> slice:
        """Rows of the stacked weight that part `shard` occupies (on this rank)."""
        start = sum(self.shard_sizes[:shard])
        return slice(start, start + self.shard_sizes[shard])

    def checkpoint_slice(self, full: torch.Tensor, part: int, leaf: str) -> torch.Tensor:
        """The piece of a checkpoint tensor (part `part`'s full weight or bias) this rank keeps."""
        r = self.tp.rank
        if self.parallel == "column":
            n = self.shard_sizes[part]
            return full.narrow(0, r * n, n) if full.shape[0] == n * self.tp.size else full
        if self.parallel == "row" and leaf == "weight" and full.dim() == 2:
            n = self.weight.shape[1]
            return full.narrow(1, r * n, n) if full.shape[1] == n * self.tp.size else full
        return full
