"""Reference attention in plain torch: works on CPU and GPU, pads the batch for one SDPA call.

An FP8 cache is dequantised after the gather (only the batch's slots), then SDPA runs in the
model's dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minisgl.attention.base import FP8_DTYPE, AttentionBackend, dequantize_fp8, gather_fp8
from minisgl.attention.batch import ForwardBatch


class TorchAttention(AttentionBackend):
    """Gathers each request's K/V from the pool into a padded tensor and runs SDPA with a mask."""

    name = "torch"
    supports_fp8_kv = True

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self._slots = torch.empty(0)
        self._mask = torch.empty(0)
        self._q_index = torch.empty(0)

    def prepare(self, batch: ForwardBatch) -> None:
        device = batch.input_ids.device
        max_len = max(batch.seq_lens_cpu)
        max_ext = max(batch.extend_lens_cpu)
        pos = torch.arange(max_len, device=device)
        pages = batch.page_table[batch.req_rows][:, pos // batch.page_size].long()
        slots = pages * batch.page_size + pos % batch.page_size  # [B, L]
        seq = batch.seq_lens.long()[:, None]
        valid = pos[None, :] < seq
        self._slots = torch.where(valid, slots, 0)
        # Query j of request i sits at absolute position prefix_i + j.
        prefix = (batch.seq_lens - batch.extend_lens).long()
        qpos = prefix[:, None] + torch.arange(max_ext, device=device)[None, :]  # [B, E]
        mask = pos[None, None, :] <= qpos[:, :, None]
        mask &= valid[:, None, :]
        self._mask = mask[:, None]  # [B, 1, E, L]
        # Where each flattened new token goes in the padded [B, E] query layout.
        starts = torch.cumsum(batch.extend_lens, 0) - batch.extend_lens
        ext = batch.extend_lens.long()
        tok = torch.arange(int(sum(batch.extend_lens_cpu)), device=device)
        req = torch.repeat_interleave(torch.arange(batch.batch_size, device=device), ext)
        self._q_index = req * max_ext + (tok - starts.long()[req])

    def attend(self, q: torch.Tensor, layer: int, batch: ForwardBatch) -> torch.Tensor:
        k_cache, v_cache = batch.k_caches[layer], batch.v_caches[layer]
        bsz, max_ext = self._mask.shape[0], self._mask.shape[2]
        num_heads, head_dim = q.shape[1], q.shape[2]
        q_pad = q.new_zeros(bsz * max_ext, num_heads, head_dim)
        q_pad[self._q_index] = q
        q_pad = q_pad.view(bsz, max_ext, num_heads, head_dim).transpose(1, 2)
        if k_cache.dtype == FP8_DTYPE:
            k_scale, v_scale = self.scales(layer)
            keys = dequantize_fp8(gather_fp8(k_cache, self._slots), k_scale, q.dtype)
            values = dequantize_fp8(gather_fp8(v_cache, self._slots), v_scale, q.dtype)
        else:
            keys, values = k_cache[self._slots], v_cache[self._slots]
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [B, Hkv, L, D]
        out = F.scaled_dot_product_attention(
            q_pad, keys, values, attn_mask=self._mask, scale=self.scale, enable_gqa=True
        )
        out = out.transpose(1, 2).reshape(bsz * max_ext, num_heads, head_dim)
        return out[self._q_index]
