"""Rotary position embedding (NeoX layout), with llama3 frequency scaling."""

from __future__ import annotations

import math

import torch
from torch import nn

from minisgl.kernels import fused_rotary_
from minisgl.layers.rope_config import RopeConfig


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """Inverse frequencies, float32, [head_dim // 2]."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "default":
        return inv
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the middle interpolated.
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Applies rotary embeddings to q and k given each token's absolute position (in one Triton
    kernel on the GPU unless `fused` is False)."""

    def __init__(
        self, head_dim: int, rope: RopeConfig, max_positions: int, fused: bool = True
    ) -> None:
        super().__init__()
        self.fused = fused
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * rope_inv_freq(
            head_dim, rope
        )
        # [max_positions, head_dim]: cos in the first half, sin in the second.
        self.cos_sin: torch.Tensor
        self.register_buffer(
            "cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False
        )

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hk, D] -> rotated (same shapes and dtypes; in place on GPU)."""
        rotated = fused_rotary_(positions, q, k, self.cos_sin) if self.fused else None
        if rotated is not None:
            return rotated
        cos, sin = self.cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
