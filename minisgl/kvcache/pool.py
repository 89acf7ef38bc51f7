"""The KV cache storage: per-layer K and V tensors addressed by slot = page * page_size + offset."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from minisgl.attention.base import FP8_DTYPE, KVQuant

#: --kv-cache-dtype values -> storage dtype (None: the model's own).
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {"auto": None, "fp8_e4m3": FP8_DTYPE}


def kv_storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the pool stores K/V in for a --kv-cache-dtype value."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(
            f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, not {kv_cache_dtype!r}"
        )
    return KV_CACHE_DTYPES[kv_cache_dtype] or model_dtype


class KVPool:
    """K and V buffers for every layer, [(num_pages + 1) * page_size, num_kv_heads, head_dim].

    Page `num_pages` (the last) is a scratch page that no request owns: padded rows of a
    CUDA-graph batch read and write it.

    With `kv_cache_dtype` fp8_e4m3 the buffers are float8_e4m3fn and `quant` holds one K and
    one V scale per layer (`k_scales` / `v_scales`, default 1.0 each); otherwise they are in
    `dtype`, the model's, and `quant` is None.
    """

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        kv_cache_dtype: str = "auto",
        k_scales: Sequence[float] | None = None,
        v_scales: Sequence[float] | None = None,
    ) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.scratch_page = num_pages
        self.dtype = kv_storage_dtype(kv_cache_dtype, dtype)
        self.quant: KVQuant | None = None
        if self.dtype == FP8_DTYPE:
            ones = (1.0,) * num_layers
            self.quant = KVQuant(
                dtype,
                ones if k_scales is None else tuple(float(s) for s in k_scales),
                ones if v_scales is None else tuple(float(s) for s in v_scales),
            )
            if len(self.quant.k_scales) != num_layers:
                raise ValueError(
                    f"kv scales: {len(self.quant.k_scales)} given for {num_layers} layers"
                )
        elif k_scales is not None or v_scales is not None:
            raise ValueError("kv scales apply to an FP8 KV cache only (kv_cache_dtype fp8_e4m3)")
        shape = ((num_pages + 1) * page_size, num_kv_heads, head_dim)
        self.k_caches = [
            torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(num_layers)
        ]
        self.v_caches = [
            torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(num_layers)
        ]

    @staticmethod
    def bytes_per_page(
        num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Memory one page takes across all layers, K and V, stored in `dtype`."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return 2 * num_layers * page_size * num_kv_heads * head_dim * itemsize
