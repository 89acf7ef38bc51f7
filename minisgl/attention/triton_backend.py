"""Paged attention in Triton: split-KV decode kernel and a varlen extend kernel.

Requests adding one token (decodes, which the scheduler puts first in a batch) use
minisgl.kernels.attention.decode_attention; the requests after the leading run of those use
extend_attention, so in a step that mixes prefill chunks with decodes each decode still reads
its keys once per kv head (the extend kernel would read them once per query head, in a
128-row tile holding one row). All host-side decisions (how many leading decodes, the number of
KV splits, the extend kernel's query blocks) are made in prepare() from the batch's CPU lists,
so forward() launches kernels without host syncs.
"""

from __future__ import annotations

import torch

from minisgl.attention.base import FP8_DTYPE, AttentionBackend
from minisgl.attention.batch import ForwardBatch
from minisgl.kernels import attention as kernels
from minisgl.transfer import HostToDevice


class TritonAttention(AttentionBackend):
    """Stores new K/V with torch indexing, then runs the decode or extend Triton kernel.

    Reads an FP8 cache too (kv_quant): the kernels dequantise each tile as they load it, and on
    CUDA one kernel quantises and stores the new K and V.

    num_splits, when given, fixes the decode kernel's number of KV splits (tests use it);
    otherwise it follows the batch size, kv heads, longest sequence and the GPU's SM count.
    """

    name = "triton"
    supports_cuda_graph = True
    supports_fp8_kv = True

    def __init__(self, scale: float, num_splits: int | None = None) -> None:
        self.scale = scale
        self.num_splits_override = num_splits
        self.num_splits = 1
        self._num_decode = 0  # leading one-token requests, run by the decode kernel
        self._blocks = torch.empty(0, dtype=torch.int32)  # the extend kernel's tiles (the rest)
        self._mid_o: torch.Tensor | None = None
        self._mid_lse: torch.Tensor | None = None
        self._h2d = HostToDevice()

    def prepare(self, batch: ForwardBatch) -> None:
        device = batch.input_ids.device
        _, num_kv_heads, head_dim = batch.k_caches[0].shape
        ext = batch.extend_lens_cpu
        d = next((i for i, n in enumerate(ext) if n != 1), len(ext))
        self._num_decode = d
        self._mid_o = self._mid_lse = None
        if d:
            longest = max(batch.seq_lens_cpu[:d])
            if self.num_splits_override is not None:
                splits = self.num_splits_override
            else:
                splits = kernels.choose_num_splits(
                    d, num_kv_heads, longest, kernels.num_sms(device)
                )
            self.num_splits = max(1, min(splits, longest))
        if d < len(ext):
            # The kernel's tiles follow the queries' dtype (the model's, also for an FP8 cache).
            dtype = self.kv_quant.dtype if self.kv_quant is not None else batch.k_caches[0].dtype
            block_m = kernels.extend_config(head_dim, dtype).block_m
            blocks = kernels.extend_blocks(ext, batch.seq_lens_cpu, block_m, first=d)
            self._blocks = self._h2d(blocks, torch.int32, device)
        else:
            self._blocks = torch.empty(0, dtype=torch.int32)

    def prepare_capture(self, batch: ForwardBatch) -> None:
        """A decode graph: splits sized for the longest context this page table can hold
        (the kernel reads each sequence's length on the device, empty splits cost little)."""
        _, num_kv_heads, _ = batch.k_caches[0].shape
        max_len = batch.page_table.shape[1] * batch.page_size
        self._num_decode = batch.batch_size
        self._blocks = torch.empty(0, dtype=torch.int32)
        self._mid_o = self._mid_lse = None
        self.num_splits = self.num_splits_override or kernels.choose_num_splits(
            batch.batch_size, num_kv_heads, max_len, kernels.num_sms(batch.input_ids.device)
        )

    def store_kv(
        self, k: torch.Tensor, v: torch.Tensor, layer: int, batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """An FP8 cache on CUDA: one store kernel for K and V (quantising); else the base's."""
        k_cache, v_cache = batch.k_caches[layer], batch.v_caches[layer]
        if k_cache.dtype != FP8_DTYPE or not k_cache.is_cuda:
            return super().store_kv(k, v, layer, batch)
        if self.kv_quant is None:
            raise RuntimeError(f"{self.name} attention: an FP8 KV cache needs kv_quant set")
        k_scale, v_scale = self.scales(layer)
        kernels.store_kv_fp8(k, v, k_cache, v_cache, batch.out_slots, k_scale, v_scale)
        return k_cache, v_cache

    def _empty(
        self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Uninitialised output / scratch buffers (tests override this to poison them)."""
        return torch.empty(shape, dtype=dtype, device=device)

    def attend(self, q: torch.Tensor, layer: int, batch: ForwardBatch) -> torch.Tensor:
        k_cache, v_cache = batch.k_caches[layer], batch.v_caches[layer]
        k_scale, v_scale = self.scales(layer)
        out = self._empty(q.shape, q.dtype, q.device)
        d = self._num_decode
        if d:
            if self.num_splits > 1 and self._mid_o is None:
                # One scratch buffer per step, reused by every layer (same stream, same shapes).
                shape = (d, q.shape[1], self.num_splits)
                self._mid_o = self._empty((*shape, q.shape[2]), torch.float32, q.device)
                self._mid_lse = self._empty(shape, torch.float32, q.device)
            whole = d == q.shape[0]  # a pure decode step: no views to make
            kernels.decode_attention(
                q if whole else q[:d],
                k_cache,
                v_cache,
                out if whole else out[:d],
                batch.req_rows if whole else batch.req_rows[:d],
                batch.page_table,
                batch.seq_lens if whole else batch.seq_lens[:d],
                batch.page_size,
                self.scale,
                self.num_splits,
                self._mid_o,
                self._mid_lse,
                k_scale,
                v_scale,
            )
        if self._blocks.numel():
            kernels.extend_attention(
                q,
                k_cache,
                v_cache,
                out,
                self._blocks,
                batch.req_rows,
                batch.page_table,
                batch.seq_lens,
                batch.extend_lens,
                batch.page_size,
                self.scale,
                k_scale,
                v_scale,
            )
        return out
