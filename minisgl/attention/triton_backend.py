"""Paged attention in Triton: split-KV decode kernel and a varlen extend kernel.

Decode steps (every request adds one token) use minisgl.kernels.attention.decode_attention;
any other step, including mixed prefill chunks and decodes, uses extend_attention. All host-side
decisions (number of KV splits, the extend kernel's query blocks) are made in prepare() from the
batch's CPU lists, so forward() launches kernels without host syncs.
"""

from __future__ import annotations

import torch

from minisgl.attention.base import AttentionBackend, ForwardBatch
from minisgl.kernels import attention as kernels
from minisgl.transfer import HostToDevice


class TritonAttention(AttentionBackend):
    """Stores new K/V with torch indexing, then runs the decode or extend Triton kernel.

    num_splits, when given, fixes the decode kernel's number of KV splits (tests use it);
    otherwise it follows the batch size, kv heads, longest sequence and the GPU's SM count.
    """

    name = "triton"
    supports_cuda_graph = True

    def __init__(self, scale: float, num_splits: int | None = None) -> None:
        self.scale = scale
        self.num_splits_override = num_splits
        self.num_splits = 1
        self._decode = True
        self._blocks = torch.empty(0, dtype=torch.int32)
        self._mid_o: torch.Tensor | None = None
        self._mid_lse: torch.Tensor | None = None
        self._h2d = HostToDevice()

    def prepare(self, batch: ForwardBatch) -> None:
        device = batch.input_ids.device
        _, num_kv_heads, head_dim = batch.k_caches[0].shape
        self._decode = batch.is_decode
        self._mid_o = self._mid_lse = None
        if self._decode:
            if self.num_splits_override is not None:
                splits = self.num_splits_override
            else:
                splits = kernels.choose_num_splits(
                    batch.batch_size,
                    num_kv_heads,
                    max(batch.seq_lens_cpu),
                    kernels.num_sms(device),
                )
            self.num_splits = max(1, min(splits, max(batch.seq_lens_cpu)))
        else:
            block_m = kernels.extend_config(head_dim, batch.k_caches[0].dtype).block_m
            blocks = kernels.extend_blocks(batch.extend_lens_cpu, batch.seq_lens_cpu, block_m)
            self._blocks = self._h2d(blocks, torch.int32, device)

    def prepare_capture(self, batch: ForwardBatch) -> None:
        """A decode graph: splits sized for the longest context this page table can hold
        (the kernel reads each sequence's length on the device, empty splits cost little)."""
        _, num_kv_heads, _ = batch.k_caches[0].shape
        max_len = batch.page_table.shape[1] * batch.page_size
        self._decode = True
        self._mid_o = self._mid_lse = None
        self.num_splits = self.num_splits_override or kernels.choose_num_splits(
            batch.batch_size, num_kv_heads, max_len, kernels.num_sms(batch.input_ids.device)
        )

    def _empty(
        self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Uninitialised output / scratch buffers (tests override this to poison them)."""
        return torch.empty(shape, dtype=dtype, device=device)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: ForwardBatch
    ) -> torch.Tensor:
        k_cache, v_cache = self.store_kv(k, v, layer, batch)
        out = self._empty(q.shape, q.dtype, q.device)
        if self._decode:
            if self.num_splits > 1 and self._mid_o is None:
                # One scratch buffer per step, reused by every layer (same stream, same shapes).
                bsz, hq, head_dim = q.shape
                shape = (bsz, hq, self.num_splits)
                self._mid_o = self._empty((*shape, head_dim), torch.float32, q.device)
                self._mid_lse = self._empty(shape, torch.float32, q.device)
            kernels.decode_attention(
                q,
                k_cache,
                v_cache,
                out,
                batch.req_rows,
                batch.page_table,
                batch.seq_lens,
                batch.page_size,
                self.scale,
                self.num_splits,
                self._mid_o,
                self._mid_lse,
            )
        else:
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
            )
        return out
