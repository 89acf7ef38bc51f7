"""The batch every forward pass sees (built by the ModelRunner from the scheduler's plan)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the backend interface takes this batch: a type-only reference
    from minisgl.attention.base import AttentionBackend


@dataclass
class ForwardBatch:
    """One forward step over a ragged batch: each request adds `extend_lens[i]` new tokens.

    New tokens are flattened request after request. A decode step has every extend length 1;
    a prefill (or a chunk of one) may continue after `seq_lens[i] - extend_lens[i]` tokens
    already in the KV cache. Token t of request i is stored in KV slot
    `page_table[req_rows[i], t // page_size] * page_size + t % page_size`.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    out_slots: torch.Tensor  # [T] int64, KV slot written by each new token
    req_rows: torch.Tensor  # [B] int64, rows of page_table
    page_table: torch.Tensor  # [max_requests, max_pages_per_request] int32
    seq_lens: torch.Tensor  # [B] int32, tokens in cache after this step
    extend_lens: torch.Tensor  # [B] int32
    seq_lens_cpu: list[int]
    extend_lens_cpu: list[int]
    page_size: int
    # Per layer [num_slots, num_kv_heads, head_dim], in the model's dtype or float8_e4m3fn (an
    # FP8 cache: its scales are the backend's kv_quant).
    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]
    attn: AttentionBackend

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode(self) -> bool:
        return all(n == 1 for n in self.extend_lens_cpu)

    @property
    def last_token_indices(self) -> torch.Tensor:
        """Index into the flattened tokens of each request's last new token."""
        return torch.cumsum(self.extend_lens, 0) - 1
