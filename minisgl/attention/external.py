"""Optional attention backends over the same paged KV cache: FlashInfer and FlashAttention 3.

NOT RUN ON A GPU YET: neither library has been installed where minisgl's GPU tests run, so
these backends have only been checked on the CPU (their page-index arithmetic, and that choosing one
without the library gives a clear error). They are used only when asked for by name
(`--attention-backend flashinfer | fa3`), never picked by `auto`, and run decode eagerly (no
CUDA graphs). The KV pool's per-layer [num_slots, Hkv, D] tensors are viewed as
[num_pages + 1, page_size, Hkv, D], the "NHD" paged layout both libraries read; new K/V are
stored by us before the library call, as in the other backends. Neither reads an FP8 cache
here (supports_fp8_kv is False): `--kv-cache-dtype fp8_e4m3` with one of them is refused when
the engine starts.
"""

from __future__ import annotations

from itertools import accumulate
from typing import Any

import torch

from minisgl.attention.base import AttentionBackend
from minisgl.attention.batch import ForwardBatch
from minisgl.transfer import HostToDevice


class PagedCSR:
    """Each request's pages in CSR form: request i owns pages indices[indptr[i]:indptr[i+1]],
    the last holding last_page_len[i] tokens (FlashInfer's description of a paged cache)."""

    def __init__(self, batch: ForwardBatch, h2d: HostToDevice) -> None:
        ps = batch.page_size
        counts = [-(-n // ps) for n in batch.seq_lens_cpu]
        self.indptr = [0, *accumulate(counts)]
        self.last_page_len = [
            n - (c - 1) * ps for n, c in zip(batch.seq_lens_cpu, counts, strict=True)
        ]
        self.qo_indptr = [0, *accumulate(batch.extend_lens_cpu)]
        total = self.indptr[-1]
        device = batch.page_table.device
        meta = h2d(counts + self.indptr[:-1], torch.int64, device)
        n, starts = meta[: len(counts)], meta[len(counts) :]
        # Row of each page slot and its column in that row, built on the device (no syncs).
        rows = torch.repeat_interleave(batch.req_rows, n, output_size=total)
        first = torch.repeat_interleave(starts, n, output_size=total)
        cols = torch.arange(total, device=device) - first
        self.indices = batch.page_table[rows, cols].to(torch.int32)


def _i32(values: list[int]) -> torch.Tensor:
    """A host int32 tensor (FlashInfer plans from host-side index pointers)."""
    return torch.tensor(values, dtype=torch.int32)


def _paged(cache: torch.Tensor, page_size: int) -> torch.Tensor:
    slots, heads, dim = cache.shape
    return cache.view(slots // page_size, page_size, heads, dim)


class FlashInferAttention(AttentionBackend):
    """FlashInfer's batch prefill (extend and mixed steps) and decode wrappers."""

    name = "flashinfer"
    WORKSPACE_BYTES = 128 * 2**20

    def __init__(self, scale: float) -> None:
        import flashinfer  # noqa: F401  (ImportError is turned into a clear message by registry)

        self.scale = scale
        self._h2d = HostToDevice()
        self._wrappers: dict[str, Any] = {}
        self._csr: PagedCSR | None = None
        self._decode = False
        self._planned = False

    def _wrapper(self, kind: str, device: torch.device) -> Any:
        import flashinfer

        if not self._wrappers:
            workspace = torch.empty(self.WORKSPACE_BYTES, dtype=torch.uint8, device=device)
            self._wrappers = {
                "prefill": flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD"),
                "decode": flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    workspace, "NHD", use_tensor_cores=True
                ),
            }
        return self._wrappers[kind]

    def prepare(self, batch: ForwardBatch) -> None:
        self._csr = PagedCSR(batch, self._h2d)
        self._decode = batch.is_decode
        self._planned = False  # plan at layer 0, when the query heads are known

    def _plan(self, q: torch.Tensor, batch: ForwardBatch) -> None:
        csr = self._csr
        assert csr is not None
        _, num_kv_heads, head_dim = batch.k_caches[0].shape
        indptr = _i32(csr.indptr)
        last = _i32(csr.last_page_len)
        common = {"q_data_type": q.dtype, "kv_data_type": batch.k_caches[0].dtype}
        if self._decode:
            self._wrapper("decode", q.device).plan(
                indptr, csr.indices, last, q.shape[1], num_kv_heads, head_dim,
                batch.page_size, sm_scale=self.scale, **common,
            )  # fmt: skip
        else:
            self._wrapper("prefill", q.device).plan(
                _i32(csr.qo_indptr), indptr, csr.indices, last,
                q.shape[1], num_kv_heads, head_dim, batch.page_size,
                causal=True, sm_scale=self.scale, **common,
            )  # fmt: skip
        self._planned = True

    def attend(self, q: torch.Tensor, layer: int, batch: ForwardBatch) -> torch.Tensor:
        k_cache, v_cache = batch.k_caches[layer], batch.v_caches[layer]
        if not self._planned:
            self._plan(q, batch)
        kv = (_paged(k_cache, batch.page_size), _paged(v_cache, batch.page_size))
        wrapper = self._wrapper("decode" if self._decode else "prefill", q.device)
        out: torch.Tensor = wrapper.run(q, kv)
        return out


class FlashAttention3(AttentionBackend):
    """FlashAttention 3 (`flash_attn_interface`, Hopper): varlen queries over the paged cache."""

    name = "fa3"

    def __init__(self, scale: float) -> None:
        from flash_attn_interface import flash_attn_with_kvcache

        self._attn = flash_attn_with_kvcache
        self.scale = scale
        self._h2d = HostToDevice()
        self._pages = torch.empty(0)
        self._cu_q = torch.empty(0)
        self._max_q = 1

    def prepare(self, batch: ForwardBatch) -> None:
        self._pages = batch.page_table[batch.req_rows]  # [B, max pages] int32
        cu_q = [0, *accumulate(batch.extend_lens_cpu)]
        self._cu_q = self._h2d(cu_q, torch.int32, batch.page_table.device)
        self._max_q = max(batch.extend_lens_cpu)

    def attend(self, q: torch.Tensor, layer: int, batch: ForwardBatch) -> torch.Tensor:
        k_cache, v_cache = batch.k_caches[layer], batch.v_caches[layer]
        out: torch.Tensor = self._attn(
            q,
            _paged(k_cache, batch.page_size),
            _paged(v_cache, batch.page_size),
            cache_seqlens=batch.seq_lens,
            page_table=self._pages,
            cu_seqlens_q=self._cu_q,
            max_seqlen_q=self._max_q,
            softmax_scale=self.scale,
            causal=True,
        )
        return out
