"""Parse a Hugging Face config.json into the one frozen config our decoder reads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minisgl.layers.rope_config import RopeConfig
from minisgl.models.errors import ModelLoadError

#: Architectures served by the single decoder implementation in minisgl.models.decoder.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
)


@dataclass(frozen=True)
class ModelConfig:
    """Everything the decoder needs to know about a checkpoint's architecture."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    dtype: str
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    # Mixture of experts (Qwen3-MoE, Mixtral); num_experts == 0: every layer is dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the top-k routing weights to sum to 1
    moe_layers: tuple[int, ...] = ()  # the layers whose MLP is router + experts

    def is_moe_layer(self, layer: int) -> bool:
        """Whether `layer`'s MLP block is a sparse mixture of experts."""
        return layer in self.moe_layers

    def tp_problem(self, tp_size: int) -> str | None:
        """Why this model cannot be split over `tp_size` ranks, or None if it can."""
        for what, n in (
            ("attention heads", self.num_heads),
            ("key/value heads", self.num_kv_heads),
            ("intermediate_size", self.intermediate_size),
            ("moe_intermediate_size", self.moe_intermediate_size),
        ):
            if n % tp_size:
                return f"{what} ({n}) is not divisible by the tensor-parallel size {tp_size}"
        return None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @staticmethod
    def from_dict(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from the raw JSON dict of an HF config; raises ModelLoadError if unsupported."""
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"{source}: unsupported architecture {arch!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden = int(raw["hidden_size"])
            num_heads = int(raw["num_attention_heads"])
            vocab = int(raw["vocab_size"])
            inter = int(raw["intermediate_size"])
            layers = int(raw["num_hidden_layers"])
        except KeyError as e:
            raise ModelLoadError(f"{source}: missing required field {e.args[0]!r}") from None
        if raw.get("mlp_bias"):
            raise ModelLoadError(f"{source}: mlp_bias=true is not supported")
        if raw.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(f"{source}: hidden_act {raw.get('hidden_act')!r} is not supported")
        if arch in ("Qwen2ForCausalLM", "Qwen3MoeForCausalLM") and raw.get("use_sliding_window"):
            raise ModelLoadError(f"{source}: sliding-window attention is not supported")
        sliding = raw.get("sliding_window")
        if arch in ("MistralForCausalLM", "MixtralForCausalLM") and sliding is not None:
            window = int(raw["sliding_window"])
            if window < int(raw.get("max_position_embeddings", 0)):
                raise ModelLoadError(f"{source}: sliding_window={window} is not supported")
        head_dim = raw.get("head_dim") or hidden // num_heads
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return ModelConfig(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_layers=layers,
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=_parse_rope(raw, source),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
            eos_token_ids=eos_ids,
            bos_token_id=raw.get("bos_token_id"),
            **_parse_moe(raw, arch, layers, source),
        )


def _parse_moe(raw: dict[str, Any], arch: str, num_layers: int, source: str) -> dict[str, Any]:
    """The mixture-of-experts fields of ModelConfig (none for a dense architecture).

    Mixtral: every layer sparse, `num_local_experts` experts of `intermediate_size`, top-k
    weights always renormalised. Qwen3-MoE: `num_experts` (transformers >= 5 writes
    `num_local_experts`) of `moe_intermediate_size`; layer i is sparse when it is not in
    `mlp_only_layers` and (i + 1) % `decoder_sparse_step` == 0; `norm_topk_prob` as given.
    Neither has shared experts.
    """
    if arch == "MixtralForCausalLM":
        experts = raw.get("num_local_experts", 8)
        inter_field, norm, step = "intermediate_size", True, 1
        dense_layers: Any = []
    elif arch == "Qwen3MoeForCausalLM":
        experts = raw.get("num_experts", raw.get("num_local_experts", 0))
        inter_field = "moe_intermediate_size"
        norm = bool(raw.get("norm_topk_prob", False))
        step = raw.get("decoder_sparse_step", 1)
        dense_layers = raw.get("mlp_only_layers") or []
    else:
        return {}
    fields = {"num_experts": experts, "decoder_sparse_step": step}
    if experts:
        fields |= {
            "num_experts_per_tok": raw.get("num_experts_per_tok"),
            inter_field: raw.get(inter_field),
        }
    for field, value in fields.items():
        low = 0 if field == "num_experts" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            kind = "a non-negative" if low == 0 else "a positive"
            raise ModelLoadError(f"{source}: {field} must be {kind} integer, got {value!r}")
    if not experts:
        return {}
    top_k = raw["num_experts_per_tok"]
    if top_k > experts:
        raise ModelLoadError(
            f"{source}: num_experts_per_tok ({top_k}) is more than the experts ({experts})"
        )
    if not isinstance(dense_layers, list) or not all(isinstance(i, int) for i in dense_layers):
        raise ModelLoadError(f"{source}: mlp_only_layers must be a list of layer indices")
    layers = tuple(i for i in range(num_layers) if i not in dense_layers and (i + 1) % step == 0)
    return {
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": raw[inter_field],
        "norm_topk_prob": norm,
        "moe_layers": layers,
    }


def _parse_rope(raw: dict[str, Any], source: str) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta inside); older files write
    # `rope_scaling` and `rope_theta`.
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type != "llama3":
        raise ModelLoadError(f"{source}: rope type {rope_type!r} is not supported")
    return RopeConfig(
        theta=theta,
        rope_type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def load_json(path: Path) -> dict[str, Any]:
    """Read a JSON file, turning a missing or malformed file into a ModelLoadError naming it."""
    if not path.is_file():
        raise ModelLoadError(f"missing file: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data
