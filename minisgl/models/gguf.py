"""GGUF checkpoints (llama.cpp's single-file format): config from metadata, weights dequantized.

Read with the `gguf` package (`pip install 'minisgl[gguf]'`). Every tensor is dequantized by
`gguf.quants.dequantize` to float32 when it is loaded (the loader then copies it into a
parameter of the serving dtype), so the engine never sees a quantized tensor and tensor
parallelism slices GGUF tensors like any other. GGUF tensor names are mapped to the Hugging
Face names the loader expects, and for llama the row permutation that llama.cpp's converter
applies to q_proj / k_proj (for its interleaved rotary layout) is undone, since our decoder uses
HF's rotate-half layout.

This module imports neither torch nor transformers at import time: the server's frontend
resolves models (and so reads GGUF metadata) without them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minisgl.layers.rope_config import RopeConfig
from minisgl.models.config import ModelConfig
from minisgl.models.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

#: general.architecture -> (our architecture name, whether q/k rows are permuted by llama.cpp).
GGUF_ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("LlamaForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
}

#: Tensor types that load (names of gguf.GGMLQuantizationType members).
SUPPORTED_TENSOR_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)

# Tokens that end a chat turn in the templates of common models; one that a GGUF's chat
# template uses is a stop token (as llama.cpp treats them).
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
)

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_tensor_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor (`blk.3.attn_q.weight` ->
    `model.layers.3.self_attn.q_proj.weight`); an unknown name is returned unchanged."""
    m = _LAYER_NAME.fullmatch(gguf_name)
    if m is not None:
        layer, part, leaf = m.groups()
        if part in _LAYER_TENSORS:
            return f"model.layers.{layer}.{_LAYER_TENSORS[part]}.{leaf}"
        return gguf_name
    stem, dot, leaf = gguf_name.rpartition(".")
    if dot and stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{leaf}"
    return gguf_name


def open_gguf(path: Path) -> Any:
    """A gguf.GGUFReader over `path` (memory-mapped: tensors are read when used)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelLoadError(
            f"{path}: reading GGUF files needs the gguf package (pip install 'minisgl[gguf]')"
        ) from None
    if not path.is_file():
        raise ModelLoadError(f"missing file: {path}")
    try:
        return GGUFReader(str(path), "r")
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({e})") from None


def _value(reader: Any, key: str) -> Any:
    """The value of metadata field `key` (a number, string, or list), or None if absent."""
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None:
        return None

    def one(index: int, kind: Any) -> Any:
        part = field.parts[index]
        if kind == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        return part.tolist()[0]

    if field.types[0] == GGUFValueType.ARRAY:
        return [one(i, field.types[-1]) for i in field.data]
    return one(field.data[0], field.types[0])


class GGUFMetadata:
    """Typed access to a GGUF file's metadata; errors name the file and the key."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reader = open_gguf(path)

    def get(self, key: str) -> Any:
        return _value(self.reader, key)

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelLoadError(f"{self.path}: missing metadata key {key!r}")
        return value

    def integer(self, key: str, default: int | None = None) -> int:
        value = self.get(key) if default is not None else self.require(key)
        if value is None:
            assert default is not None
            return default
        if not isinstance(value, int) or isinstance(value, bool):
            raise ModelLoadError(f"{self.path}: metadata key {key!r} must be an integer")
        return value

    def number(self, key: str, default: float | None = None) -> float:
        value = self.get(key) if default is not None else self.require(key)
        if value is None:
            assert default is not None
            return default
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ModelLoadError(f"{self.path}: metadata key {key!r} must be a number")
        return float(value)

    def tensor_names(self) -> set[str]:
        return {t.name for t in self.reader.tensors}


def gguf_config(path: Path) -> ModelConfig:
    """Our ModelConfig from a GGUF file's metadata; ModelLoadError names a missing or
    unsupported key."""
    meta = GGUFMetadata(path)
    arch_key = "general.architecture"
    arch = meta.require(arch_key)
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: unsupported {arch_key} {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    ours, _ = GGUF_ARCHITECTURES[arch]
    hidden = meta.integer(f"{arch}.embedding_length")
    num_heads = meta.integer(f"{arch}.attention.head_count")
    num_kv_heads = meta.integer(f"{arch}.attention.head_count_kv", num_heads)
    head_dim = meta.integer(f"{arch}.attention.key_length", hidden // num_heads)
    value_dim = meta.integer(f"{arch}.attention.value_length", head_dim)
    if value_dim != head_dim:
        raise ModelLoadError(
            f"{path}: {arch}.attention.value_length ({value_dim}) differs from the key "
            f"length ({head_dim}); not supported"
        )
    rope_dim = meta.integer(f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ModelLoadError(
            f"{path}: {arch}.rope.dimension_count ({rope_dim}) is not the head size "
            f"({head_dim}); partial rotary embeddings are not supported"
        )
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ModelLoadError(f"{path}: {arch}.rope.scaling.type {scaling!r} is not supported")
    tensors = meta.tensor_names()
    if "rope_freqs.weight" in tensors:
        raise ModelLoadError(
            f"{path}: tensor rope_freqs.weight (rotary frequency factors, e.g. llama3 "
            "scaling) is not supported"
        )
    if "token_embd.weight" not in tensors:
        raise ModelLoadError(f"{path}: missing tensor token_embd.weight")
    vocab = meta.integer(f"{arch}.vocab_size", _embedding_rows(meta))
    eos = [meta.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    eos_ids = [e for e in eos if isinstance(e, int)] + _end_of_turn_ids(meta)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        architecture=ours,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=meta.integer(f"{arch}.feed_forward_length"),
        num_layers=meta.integer(f"{arch}.block_count"),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=meta.number(f"{arch}.attention.layer_norm_rms_epsilon"),
        rope=RopeConfig(theta=meta.number(f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=meta.integer(f"{arch}.context_length"),
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensors,
        qk_norm=arch == "qwen3",
        dtype=_serving_dtype(meta),
        eos_token_ids=tuple(dict.fromkeys(eos_ids)),
        bos_token_id=bos if isinstance(bos, int) else None,
    )


def _embedding_rows(meta: GGUFMetadata) -> int:
    tensor = next(t for t in meta.reader.tensors if t.name == "token_embd.weight")
    return int(tensor.shape[-1])  # GGUF shapes list the fastest-varying dimension first


def _serving_dtype(meta: GGUFMetadata) -> str:
    """The dtype `--dtype auto` serves a GGUF in on a GPU: float32 / float16 files keep theirs,
    quantized ones use bfloat16."""
    file_type = meta.get("general.file_type")
    return {0: "float32", 1: "float16", 32: "bfloat16"}.get(file_type, "bfloat16")


def _end_of_turn_ids(meta: GGUFMetadata) -> list[int]:
    """Ids of the end-of-turn tokens the chat template writes (e.g. SmolLM2's <|im_end|>)."""
    template = meta.get("tokenizer.chat_template")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(template, str) or not isinstance(tokens, list):
        return []
    wanted = {t for t in END_OF_TURN_TOKENS if t in template}
    return [i for i, t in enumerate(tokens) if t in wanted]


def gguf_tensors(path: Path, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every tensor of the file, dequantized, with llama's q/k
    rows put back in HF order. ModelLoadError names a tensor of an unsupported type."""
    import numpy as np
    import torch
    from gguf.quants import dequantize

    reader = open_gguf(path)
    arch = _value(reader, "general.architecture")
    permuted = GGUF_ARCHITECTURES.get(arch, ("", False))[1]
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TENSOR_TYPES:
            raise ModelLoadError(
                f"{path.name}: tensor {t.name} has type {kind}, which is not supported "
                f"(supported: {', '.join(SUPPORTED_TENSOR_TYPES)})"
            )
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        try:
            values = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except (ValueError, NotImplementedError) as e:
            raise ModelLoadError(f"{path.name}: cannot dequantize tensor {t.name} ({e})") from None
        tensor = torch.from_numpy(values.reshape(shape).copy())
        name = hf_tensor_name(t.name)
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = unpermute_rows(tensor, cfg.num_heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = unpermute_rows(tensor, cfg.num_kv_heads)
        yield name, tensor


def unpermute_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's `permute` of q/k projection rows: within each head, llama.cpp
    interleaves the two rotary halves (rows 0, d/2, 1, d/2+1, ...); HF keeps them apart."""
    head_dim = w.shape[0] // num_heads
    rest = tuple(w.shape[1:])
    return w.reshape(num_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(w.shape)
