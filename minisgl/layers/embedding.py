"""Token embedding and the LM head, split over tensor-parallel ranks by vocabulary rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minisgl.distributed.group import TPGroup


class VocabShard(nn.Module):
    """A [vocab, hidden] table of which this rank holds rows [start, start + rows).

    Each rank holds ceil(vocab / tp) rows; the last rank's tail past the vocabulary is zero.
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.tp = tp or TPGroup()
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // self.tp.size)
        self.start = self.tp.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size), requires_grad=False)

    def checkpoint_slice(self, full: torch.Tensor, part: int, leaf: str) -> torch.Tensor:
        """This rank's rows of the full [vocab, hidden] checkpoint table."""
        if self.tp.size == 1 or full.shape[0] != self.vocab_size:
            return full
        return full[self.start : self.start + self.rows]


class Embedding(VocabShard):
    """Looks up token ids; with several ranks each looks up its rows and the sum is taken."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mine = (local >= 0) & (local < self.rows)
        out = F.embedding(local.clamp(0, self.rows - 1), self.weight)
        out = out * mine.unsqueeze(-1).to(out.dtype)
        return self.tp.all_reduce(out)


class LMHead(VocabShard):
    """Projects hidden states to vocabulary logits; may share its table with the embedding.

    With several ranks each computes the logits of its rows and all ranks gather all of them.
    """

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if self.tp.size == 1:
            return logits
        return self.tp.all_gather_last(logits)[..., : self.vocab_size]
