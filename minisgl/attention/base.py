"""The interface attention backends implement."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from minisgl.attention.batch import ForwardBatch


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
