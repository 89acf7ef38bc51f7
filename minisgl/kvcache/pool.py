"""The KV cache storage: per-layer K and V tensors addressed by slot = page * page_size + offset."""

from __future__ import annotations

import torch


class KVPool:
    """K and V buffers for every layer, [(num_pages + 1) * page_size, num_kv_heads, head_dim].

    Page `num_pages` (the last) is a scratch page that no request owns: padded rows of a
    CUDA-graph batch read and write it.
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
    ) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.scratch_page = num_pages
        shape = ((num_pages + 1) * page_size, num_kv_heads, head_dim)
        self.k_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_page(
        num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Memory one page takes across all layers, K and V."""
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return 2 * num_layers * page_size * num_kv_heads * head_dim * itemsize
