"""The one decoder that serves Llama, Mistral, Qwen2, Qwen3 and the mixture-of-experts models
Qwen3-MoE and Mixtral; ModelConfig says what differs."""

from __future__ import annotations

import torch
from torch import nn

from minisgl.attention.batch import ForwardBatch
from minisgl.distributed.group import TPGroup
from minisgl.kernels import fused_qkv_rope_store
from minisgl.layers.activation import silu_and_mul
from minisgl.layers.embedding import Embedding, LMHead
from minisgl.layers.linear import MergedLinear
from minisgl.layers.moe import SparseMoE
from minisgl.layers.norm import RMSNorm
from minisgl.layers.rotary import RotaryEmbedding
from minisgl.models.config import ModelConfig


class Attention(nn.Module):
    """Fused QKV projection, optional per-head q/k RMSNorm (Qwen3), rotary, paged attention.

    On the GPU one Triton kernel takes the projection's output to the normed, rotated q and
    stores the new K/V in the cache (kernels.fused_qkv_rope_store); the backend then attends
    over the cache. Elsewhere the steps run one by one and the backend stores K/V itself.

    With tensor parallelism each rank computes its 1/tp of the query and kv heads (column-
    parallel qkv) and the output projection sums the ranks' parts (row-parallel).
    """

    def __init__(
        self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding, tp: TPGroup, fused: bool
    ) -> None:
        super().__init__()
        self.layer = layer
        self.cfg = cfg
        self.fused = fused
        self.num_heads = tp.shard(cfg.num_heads, "attention heads")
        self.num_kv_heads = tp.shard(cfg.num_kv_heads, "key/value heads")
        self.q_size = self.num_heads * cfg.head_dim  # this rank's part of the qkv output
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.qkv_proj = MergedLinear(
            cfg.hidden_size,
            [cfg.q_size, cfg.kv_size, cfg.kv_size],
            bias=cfg.qkv_bias,
            tp=tp,
            parallel="column",
        )
        self.o_proj = MergedLinear(cfg.q_size, [cfg.hidden_size], False, tp, "row")
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, fused) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, fused) if cfg.qk_norm else None
        self.rotary = rotary

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        d = self.cfg.head_dim
        q_size, kv_size = self.q_size, self.kv_size
        qkv = self.qkv_proj(hidden)
        q = self._fused_input(positions, qkv, batch) if self.fused else None
        if q is not None:  # normed, rotated, K/V stored: one kernel
            out = batch.attn.attend(q, self.layer, batch)
            return self._output(out)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, d)
        k = k.view(-1, self.num_kv_heads, d)
        v = v.view(-1, self.num_kv_heads, d)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return self._output(batch.attn.forward(q, k, v, self.layer, batch))

    def _fused_input(
        self, positions: torch.Tensor, qkv: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor | None:
        """q from the Triton kernel that norms, rotates and stores K/V; None off its path."""
        k_scale, v_scale = batch.attn.scales(self.layer)
        return fused_qkv_rope_store(
            qkv,
            positions,
            self.rotary.cos_sin,
            None if self.q_norm is None else self.q_norm.weight,
            None if self.k_norm is None else self.k_norm.weight,
            self.cfg.rms_norm_eps,
            self.num_heads,
            self.num_kv_heads,
            batch.k_caches[self.layer],
            batch.v_caches[self.layer],
            batch.out_slots,
            k_scale,
            v_scale,
        )

    def _output(self, attn_out: torch.Tensor) -> torch.Tensor:
        out = self.o_proj(attn_out.reshape(-1, self.q_size))
        assert isinstance(out, torch.Tensor)
        return out


class MLP(nn.Module):
    """SwiGLU feed-forward with a fused gate/up projection (column-parallel), down row-parallel."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        inter = cfg.intermediate_size
        self.gate_up_proj = MergedLinear(cfg.hidden_size, [inter, inter], False, tp, "column")
        self.down_proj = MergedLinear(inter, [cfg.hidden_size], False, tp, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(silu_and_mul(self.gate_up_proj(x), self.fused))
        return out


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks; the residual add is fused into the next norm. The MLP
    block is a router + experts (SparseMoE) in the layers the config makes sparse."""

    def __init__(
        self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding, tp: TPGroup, fused: bool
    ) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer, rotary, tp, fused)
        self.mlp: MLP | SparseMoE
        if cfg.is_moe_layer(layer):
            self.mlp = SparseMoE(
                cfg.hidden_size,
                cfg.moe_intermediate_size,
                cfg.num_experts,
                cfg.num_experts_per_tok,
                cfg.norm_topk_prob,
                tp,
                fused,
            )
        else:
            self.mlp = MLP(cfg, tp, fused)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.self_attn(positions, hidden, batch)
        hidden, residual = self.post_attention_layernorm.add_and_norm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderBody(nn.Module):
    """Embedding, the layer stack and the final norm (HF's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig, max_positions: int, tp: TPGroup, fused: bool) -> None:
        super().__init__()
        rotary = RotaryEmbedding(cfg.head_dim, cfg.rope, max_positions, fused)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, rotary, tp, fused) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused)


class CausalLM(nn.Module):
    """A decoder-only language model computing next-token logits for a ForwardBatch.

    `tp`: this rank's place among tensor-parallel ranks; each holds a shard of the weights
    (see MergedLinear and VocabShard) and every rank ends with the same full logits.
    `fused`: the layers use the fused Triton kernels on the GPU (False: their torch versions).
    """

    def __init__(
        self, cfg: ModelConfig, max_positions: int, tp: TPGroup | None = None, fused: bool = True
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp = tp or TPGroup()
        self.model = DecoderBody(cfg, max_positions, self.tp, fused)
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size, self.tp)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [B, vocab] (float32) at each request's last new token."""
        body = self.model
        hidden = body.embed_tokens(batch.input_ids)
        residual: torch.Tensor | None = None
        for layer in body.layers:
            hidden, residual = layer(batch.positions, hidden, residual, batch)
        assert residual is not None
        hidden = hidden + residual
        last = hidden[batch.last_token_indices]
        logits: torch.Tensor = self.lm_head(body.norm(last))
        return logits.float()
