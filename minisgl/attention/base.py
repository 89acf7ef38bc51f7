"""The batch every forward pass sees, and the interface attention backends implement."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


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
    k_caches: list[torch.Tensor]  # per layer [num_slots, num_kv_heads, head_dim]
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


class AttentionBackend(ABC):
    """Stores new K/V into the paged cache and attends over each request's cached tokens."""

    name: str = ""
    #: Whether decode steps may be captured in CUDA graphs (see prepare_capture).
    supports_cuda_graph: bool = False

    @abstractmethod
    def prepare(self, batch: ForwardBatch) -> None:
        """Build per-step metadata once, before the layers run."""

    def prepare_capture(self, batch: ForwardBatch) -> None:
        """Before capturing a decode graph of `batch`'s size: fix metadata that replays reuse.

        Called before each warm-up run and again right before the capture, it must drop the
        device buffers of earlier runs, so that the capture allocates its own in the graphs'
        memory pool. Only backends with supports_cuda_graph implement this; forward must then
        read everything that varies between steps from the batch's device tensors.
        """
        raise NotImplementedError(f"{self.name} attention does not support CUDA graphs")

    def prepare_replay(self, padded: ForwardBatch, batch: ForwardBatch) -> None:  # noqa: B027
        """Before replaying the graph captured for `padded` to run `batch` (default: nothing)."""

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: ForwardBatch
    ) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] for the new tokens -> output [T, Hq, D]."""

    @staticmethod
    def store_kv(
        k: torch.Tensor, v: torch.Tensor, layer: int, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' K/V into their pool slots; returns the layer's (K, V) cache."""
        k_cache, v_cache = batch.k_caches[layer], batch.v_caches[layer]
        k_cache[batch.out_slots] = k
        v_cache[batch.out_slots] = v
        return k_cache, v_cache
