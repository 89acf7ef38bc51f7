"""Tiny random HF checkpoints, written to disk in real HF format for the loader and parity tests."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from minisgl.models.source import DEMO_DIR

# Each variant exercises what its architecture adds; all use GQA and the demo tokenizer.
VARIANTS: dict[str, dict[str, Any]] = {
    "llama": {"arch": "LlamaForCausalLM", "tie_word_embeddings": False},
    "llama3-rope-tied": {
        "arch": "LlamaForCausalLM",
        "tie_word_embeddings": True,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "mistral": {"arch": "MistralForCausalLM", "tie_word_embeddings": False},
    "qwen2-bias": {"arch": "Qwen2ForCausalLM", "tie_word_embeddings": True},
    "qwen3-qknorm": {"arch": "Qwen3ForCausalLM", "tie_word_embeddings": False},
}

# Mixture-of-experts variants (tests/engine/test_moe.py), apart from VARIANTS so that the
# dense suites do not run them. qwen3-moe: 8 experts, top 2 without renormalisation, layer 1
# dense (mlp_only_layers); mixtral: 8 experts, top 2 renormalised, every layer sparse.
MOE_VARIANTS: dict[str, dict[str, Any]] = {
    "qwen3-moe": {
        "arch": "Qwen3MoeForCausalLM",
        "tie_word_embeddings": False,
        "num_hidden_layers": 3,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
    },
    "mixtral": {
        "arch": "MixtralForCausalLM",
        "tie_word_embeddings": False,
        "intermediate_size": 48,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
}


def hf_config(arch: str, **overrides: Any) -> Any:
    """A transformers config object for a tiny model of `arch`."""
    import transformers

    kind = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "MistralForCausalLM": transformers.MistralConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
        "Qwen3ForCausalLM": transformers.Qwen3Config,
        "Qwen3MoeForCausalLM": transformers.Qwen3MoeConfig,
        "MixtralForCausalLM": transformers.MixtralConfig,
    }[arch]
    base: dict[str, Any] = dict(
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        eos_token_id=2,
        bos_token_id=None,
        pad_token_id=0,
        initializer_range=0.1,
    )
    base.update(overrides)
    return kind(**base)


def make_checkpoint(
    out: Path,
    variant: str = "llama",
    seed: int = 0,
    max_shard_size: str | None = None,
    **overrides: Any,
) -> Path:
    """Write a random checkpoint of VARIANTS[variant] or MOE_VARIANTS[variant] (plus the demo
    tokenizer) into `out`; `overrides` change config fields (vocab_size, num_key_value_heads,
    ...)."""
    from transformers import AutoModelForCausalLM

    spec = dict(VARIANTS.get(variant) or MOE_VARIANTS[variant]) | overrides
    arch = spec.pop("arch")
    cfg = hf_config(arch, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if arch == "Qwen2ForCausalLM":
        # Random (not zero) qkv biases so the bias path is really tested.
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.1)
    out.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(DEMO_DIR / name, out / name)
    return out


def load_hf(path: Path) -> Any:
    """The reference: the same checkpoint loaded by transformers, float32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
