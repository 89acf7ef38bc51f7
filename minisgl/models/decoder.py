"""The one decoder that serves Llama, Mistral, Qwen2, Qwen3 and the mixture-of-experts models
Qwen3-MoE and Mixtral; ModelConfig says what differs."""

from __future__ import annotations

import torch
from torch import nn

from minisgl.attention.batch import ForwardBatch
from minisgl.distributed.group import TPGroup
from minisgl.layers.activation import silu_and_mul
from minisgl.layers.embedding import Embedding, LMHead
from minisgl.layers.linear import MergedLinear
from minisgl.layers.moe import SparseMoE
from minisgl.layers.norm import RMSNorm
from minisgl.layers.rotary import RotaryEmbedding
from minisgl.models.config import ModelConfig


class Attention(nn.Module):
    """Fused QKV projection, optional per-head q/k RMSNorm (Qwen3), rotary, paged attention.

    With tensor parallelism each rank computes its 1/tp of the query and kv heads (column-
    parallel qkv) and the output projection sums the ranks' parts (row-parallel).
    """

    def __init__(self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding, tp: TPGroup) -> None:
        super().__init__()
        self.layer = layer
        self.cfg = cfg
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
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary = rotary

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        d = self.cfg.head_dim
        q_size, kv_size = self.q_size, self.kv_size
        q, k, v = self.qkv_proj(hidden).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, d)
        k = k.view(-1, self.num_kv_heads, d)
        v = v.view(-1, self.num_kv_heads, d)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = batch.attn.forward(q, k, v, self.layer, batch)
        out = self.o_proj(out.reshape(-1, q_size))
        assert isinstance(out, torch.Tensor)
        return out


class MLP(nn.Module):
    """SwiGLU feed-forward with a fused gate/up projection (column-parallel), down row-parallel."""

    def __init__(self, cfg: ModelConfig, tp: TPGroup) -> None:
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = MergedLinear(cfg.hidden_size, [inter, inter], False, tp, "column")
        self.down_proj = MergedLinear(inter, [cfg.hidden_size], False, tp, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(silu_and_mul(self.gate_up_proj(x)))
        return out


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks; the residual add is fused into the next norm. The MLP
    block is a router + experts (SparseMoE) in the layers the config makes sparse."""

    def __init__(self, cfg: ModelConfig, layer: int, rotary: RotaryEmbedding, tp: TPGroup) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer, rotary, tp)
        self.mlp: MLP | SparseMoE
        if cfg.is_moe_layer(layer):
            self.mlp = SparseMoE(
                cfg.hidden_size,
                cfg.moe_intermediate_size,
                cfg.num_experts,
                cfg.num_experts_per_tok,
                cfg.norm_topk_prob,
                tp,
            )
        else:
            self.mlp = MLP(cfg, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

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

    def __init__(self, cfg: ModelConfig, max_positions: int, tp: TPGroup) -> None:
        super().__init__()
        rotary = RotaryEmbedding(cfg.head_dim, cfg.rope, max_positions)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, rotary, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """A decoder-only language model computing next-token logits for a ForwardBatch.

    `tp`: this rank's place among tensor-parallel ranks; each holds a shard of the weights
    (see MergedLinear and VocabShard) and every rank ends with the same full logits.
    """

    def __init__(self, cfg: ModelConfig, max_positions: int, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp = tp or TPGroup()
        self.model = DecoderBody(cfg, max_positions, self.tp)
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
