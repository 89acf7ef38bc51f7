"""The interface attention backends implement, and the FP8 KV-cache format they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from minisgl.attention.batch import ForwardBatch

#: The storage dtype of `--kv-cache-dtype fp8_e4m3`, and the largest value it holds.
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


@dataclass(frozen=True)
class KVQuant:
    """How an FP8 KV cache maps to real values: real K = stored K * k_scales[layer] (V alike).

    `dtype` is the model's: new K/V arrive in it and the backends compute attention with the
    dequantised values in it (accumulating in float32), whatever the storage dtype.
    """

    dtype: torch.dtype
    k_scales: tuple[float, ...]
    v_scales: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.k_scales) != len(self.v_scales):
            raise ValueError(
                f"kv scales: {len(self.k_scales)} k_scales but {len(self.v_scales)} v_scales"
            )
        for name, scales in (("k_scales", self.k_scales), ("v_scales", self.v_scales)):
            bad = [s for s in scales if not (s > 0.0 and s < float("inf"))]
            if bad:
                raise ValueError(f"kv scales: {name} must be finite and > 0, got {bad[0]}")


def fp8_unsupported(backend: str) -> ValueError:
    """The error for an FP8 KV cache with a backend that cannot read one."""
    return ValueError(
        f"--kv-cache-dtype fp8_e4m3 is not supported by the {backend} attention backend; use "
        "--attention-backend triton or torch, or --kv-cache-dtype auto"
    )


def quantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale rounded to float8_e4m3fn, saturating at +-FP8_MAX (NaN stays NaN)."""
    y = x.float() / scale if scale != 1.0 else x
    return torch.clamp(y, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def gather_fp8(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """cache[index] of an FP8 cache, gathered as bytes (torch's indexing does not cover
    float8 on every device)."""
    return cache.view(torch.uint8)[index].view(FP8_DTYPE)


def dequantize_fp8(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Stored FP8 values back to real ones in `dtype`."""
    y = x.to(dtype)
    return y * scale if scale != 1.0 else y


class AttentionBackend(ABC):
    """Stores new K/V into the paged cache and attends over each request's cached tokens."""

    name: str = ""
    #: Whether decode steps may be captured in CUDA graphs (see prepare_capture).
    supports_cuda_graph: bool = False
    #: Whether it reads an FP8 KV cache (`kv_quant`).
    supports_fp8_kv: bool = False
    #: The FP8 cache's scales, set by the model runner from its KV pool; None for a cache in the
    #: model's dtype. Scales are fixed for the pool's life, so captured graphs may bake them in.
    kv_quant: KVQuant | None = None

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

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: ForwardBatch
    ) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] for the new tokens -> output [T, Hq, D]: stores
        the new K/V (`store_kv`), then `attend`."""
        self.store_kv(k, v, layer, batch)
        return self.attend(q, layer, batch)

    @abstractmethod
    def attend(self, q: torch.Tensor, layer: int, batch: ForwardBatch) -> torch.Tensor:
        """q: [T, Hq, D] for the new tokens, whose K/V are already in the layer's cache (by
        `store_kv`, or by the fused input kernel that writes them as store_kv would) ->
        output [T, Hq, D]."""

    def use_kv_quant(self, quant: KVQuant | None) -> None:
        """Read (and write) the KV cache as FP8 with `quant`'s scales; None: the model's dtype."""
        if quant is not None and not self.supports_fp8_kv:
            raise fp8_unsupported(self.name)
        self.kv_quant = quant

    def scales(self, layer: int) -> tuple[float, float]:
        """(k_scale, v_scale) of `layer`: 1.0 for a cache in the model's dtype."""
        quant = self.kv_quant
        if quant is None:
            return 1.0, 1.0
        return quant.k_scales[layer], quant.v_scales[layer]

    def store_kv(
        self, k: torch.Tensor, v: torch.Tensor, layer: int, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' K/V into their pool slots; returns the layer's (K, V) cache.

        An FP8 cache gets k / k_scale and v / v_scale, saturated to +-448 and rounded."""
        k_cache, v_cache = batch.k_caches[layer], batch.v_caches[layer]
        if k_cache.dtype == FP8_DTYPE:
            if self.kv_quant is None:
                raise RuntimeError(f"{self.name} attention: an FP8 KV cache needs kv_quant set")
            k_scale, v_scale = self.scales(layer)
            # Through uint8 views: torch's indexed writes do not cover float8 everywhere.
            k_bytes, v_bytes = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
            k_bytes[batch.out_slots] = quantize_fp8(k, k_scale).view(torch.uint8)
            v_bytes[batch.out_slots] = quantize_fp8(v, v_scale).view(torch.uint8)
        else:
            k_cache[batch.out_slots] = k
            v_cache[batch.out_slots] = v
        return k_cache, v_cache
