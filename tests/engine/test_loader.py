"""Model resolution and loading: every broken checkpoint gives a ModelLoadError naming the
culprit; presets and config parsing; dummy weights from a bare config.json."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

from minisgl.llm import LLM
from minisgl.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeConfig
from minisgl.models.errors import ModelLoadError
from minisgl.models.loader import build_model
from minisgl.models.source import PRESETS_DIR, preset_names, resolve_model
from minisgl.sampling_params import SamplingParams
from minisgl.tokenizer.tokenizer import Prompt
from tests.helpers.checkpoints import make_checkpoint

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True)


def open_llm(path: Path | str, **options: Any) -> LLM:
    return LLM(str(path), num_pages=8, max_model_len=64, progress=False, **options)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One single-file and one sharded copy of the same tiny Llama checkpoint."""
    root = tmp_path_factory.mktemp("loader")
    return {
        "single": make_checkpoint(root / "single", "llama", seed=11),
        "sharded": make_checkpoint(root / "sharded", "llama", seed=11, max_shard_size="50KB"),
    }


@pytest.fixture
def broken(pristine: dict[str, Path], tmp_path: Path) -> Callable[[str], Path]:
    """A fresh, writable copy of a pristine checkpoint to break."""

    def copy(kind: str) -> Path:
        dst = tmp_path / kind
        shutil.copytree(pristine[kind], dst)
        return dst

    return copy


def rewrite_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def dropping(name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[name]

    return edit


def load_error(path: Path | str, **options: Any) -> str:
    with pytest.raises(ModelLoadError) as info:
        open_llm(path, **options)
    return str(info.value)


# ----- good checkpoints (the controls) -----------------------------------------------------


def test_sharded_and_single_file_checkpoints_load_the_same_model(
    pristine: dict[str, Path],
) -> None:
    index = json.loads((pristine["sharded"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    outs = [open_llm(pristine[k]).generate("Hello there", GREEDY)[0] for k in pristine]
    assert outs[0].token_ids == outs[1].token_ids
    assert len(outs[0].token_ids) == 4


# ----- broken checkpoints ------------------------------------------------------------------


def test_missing_shard_is_named(broken: Callable[[str], Path]) -> None:
    path = broken("sharded")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[2]
    (path / victim).unlink()
    assert victim in load_error(path)


@pytest.mark.parametrize(
    "tensor",
    [
        "model.layers.1.self_attn.k_proj.weight",  # part of a fused qkv parameter
        "model.layers.0.mlp.up_proj.weight",  # part of a fused gate_up parameter
        "model.layers.0.input_layernorm.weight",
        "model.embed_tokens.weight",
        "lm_head.weight",
    ],
)
def test_wrong_tensor_shape_is_named(broken: Callable[[str], Path], tensor: str) -> None:
    path = broken("single")

    def shrink(tensors: dict[str, torch.Tensor]) -> None:
        old = tensors[tensor]
        tensors[tensor] = torch.zeros(old.shape[0] + 1, *old.shape[1:])

    rewrite_tensors(path / "model.safetensors", shrink)
    message = load_error(path)
    assert tensor in message
    assert "shape" in message


@pytest.mark.parametrize(
    "tensor", ["model.layers.1.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"]
)
def test_missing_tensor_is_named(broken: Callable[[str], Path], tensor: str) -> None:
    path = broken("single")
    rewrite_tensors(path / "model.safetensors", dropping(tensor))
    assert tensor in load_error(path)


def test_missing_tensor_in_a_sharded_checkpoint_is_named(broken: Callable[[str], Path]) -> None:
    path = broken("sharded")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensor = "model.layers.0.self_attn.o_proj.weight"
    rewrite_tensors(path / index["weight_map"][tensor], dropping(tensor))
    assert tensor in load_error(path)


def test_unknown_architecture_is_named_with_the_supported_ones(
    broken: Callable[[str], Path],
) -> None:
    path = broken("single")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    message = load_error(path)
    assert "GPT2LMHeadModel" in message
    assert "LlamaForCausalLM" in message and "Qwen3ForCausalLM" in message
    assert all(arch in message for arch in SUPPORTED_ARCHITECTURES)


def test_missing_config_is_named(broken: Callable[[str], Path]) -> None:
    path = broken("single")
    (path / "config.json").unlink()
    assert "config.json" in load_error(path)


@pytest.mark.parametrize("keep", [5, 100, 0.5])
def test_corrupt_safetensors_is_named(broken: Callable[[str], Path], keep: float) -> None:
    path = broken("single")
    weights = path / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as f:
        f.truncate(int(size * keep) if isinstance(keep, float) else keep)
    assert "model.safetensors" in load_error(path)


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("single", "config.json"),
        ("single", "generation_config.json"),
        ("sharded", "model.safetensors.index.json"),
    ],
)
def test_malformed_json_is_named(broken: Callable[[str], Path], kind: str, name: str) -> None:
    path = broken(kind)
    (path / name).write_text('{"architectures": ["LlamaForCausalLM"], oops')
    assert name in load_error(path)


def test_config_without_a_required_field_is_named(broken: Callable[[str], Path]) -> None:
    path = broken("single")
    config = json.loads((path / "config.json").read_text())
    del config["num_hidden_layers"]
    (path / "config.json").write_text(json.dumps(config))
    assert "num_hidden_layers" in load_error(path)


def test_nonexistent_model_lists_the_presets(tmp_path: Path) -> None:
    message = load_error(tmp_path / "no-such-model")
    assert "no-such-model" in message and "qwen3-0.6b" in message


# ----- presets -----------------------------------------------------------------------------


def test_preset_without_dummy_weights_is_an_error() -> None:
    message = load_error("qwen3-0.6b")
    assert "qwen3-0.6b" in message and "dummy" in message


def test_qwen3_preset_config_matches_its_json() -> None:
    source = resolve_model("qwen3-0.6b", True)
    raw = json.loads((PRESETS_DIR / "qwen3-0.6b.json").read_text())
    cfg = source.config
    assert (source.weights_dir, source.tokenizer_dir) == (None, None)
    assert cfg.architecture == "Qwen3ForCausalLM"
    assert cfg.num_layers == 28 == raw["num_hidden_layers"]
    assert cfg.head_dim == 128 == raw["head_dim"]
    assert cfg.qk_norm is True and cfg.qkv_bias is False
    assert cfg.tie_word_embeddings is True
    assert cfg.hidden_size == raw["hidden_size"]
    assert cfg.intermediate_size == raw["intermediate_size"]
    assert cfg.num_heads == raw["num_attention_heads"]
    assert cfg.num_kv_heads == raw["num_key_value_heads"]
    assert cfg.vocab_size == raw["vocab_size"]
    assert cfg.max_position_embeddings == raw["max_position_embeddings"]
    assert cfg.rms_norm_eps == raw["rms_norm_eps"]
    assert cfg.rope == RopeConfig(theta=1_000_000.0)
    assert cfg.eos_token_ids == (raw["eos_token_id"],)


def test_llama31_preset_has_llama3_rope() -> None:
    cfg = resolve_model("llama-3.1-8b", True).config
    assert cfg.rope == RopeConfig(
        theta=500000.0,
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (32, 32, 8, 128)
    assert cfg.eos_token_ids == (128001, 128008, 128009)
    assert cfg.tie_word_embeddings is False and cfg.qk_norm is False


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_parses(name: str) -> None:
    cfg = resolve_model(name, True).config
    raw = json.loads((PRESETS_DIR / f"{name}.json").read_text())
    assert cfg.architecture == raw["architectures"][0]
    assert cfg.num_layers == raw["num_hidden_layers"]
    assert cfg.q_size == cfg.num_heads * cfg.head_dim
    assert cfg.num_heads % cfg.num_kv_heads == 0


def test_presets_include_the_advertised_ones() -> None:
    assert {"qwen3-0.6b", "llama-3.1-8b"} <= set(preset_names())


# ----- config parsing ----------------------------------------------------------------------

BASE_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 2048,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
LLAMA3_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.mark.parametrize("scaled", [False, True])
def test_rope_parameters_and_rope_scaling_give_the_same_rope(scaled: bool) -> None:
    scaling = {"rope_type": "llama3", **LLAMA3_SCALING} if scaled else None
    old_style = {**BASE_CONFIG, "rope_theta": 500000.0, "rope_scaling": scaling}
    new_style = {
        **BASE_CONFIG,
        "rope_parameters": {"rope_theta": 500000.0, **(scaling or {"rope_type": "default"})},
    }
    old = ModelConfig.from_dict(old_style).rope
    new = ModelConfig.from_dict(new_style).rope
    assert old == new
    assert old.theta == 500000.0
    assert old.rope_type == ("llama3" if scaled else "default")
    if scaled:
        assert (old.factor, old.original_max_position_embeddings) == (8.0, 8192)


def test_rope_scaling_with_legacy_type_key() -> None:
    cfg = {
        **BASE_CONFIG,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "llama3", **LLAMA3_SCALING},
    }
    assert ModelConfig.from_dict(cfg).rope.rope_type == "llama3"


def test_config_written_by_installed_transformers_parses(checkpoints: dict[str, Path]) -> None:
    """Whatever key style this transformers writes, the llama3 rope survives the round trip."""
    raw = json.loads((checkpoints["llama3-rope-tied"] / "config.json").read_text())
    rope = ModelConfig.from_dict(raw).rope
    assert rope == RopeConfig(
        theta=10000.0,
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    )


def test_unsupported_rope_type_is_named() -> None:
    cfg = {**BASE_CONFIG, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(ModelLoadError, match="yarn"):
        ModelConfig.from_dict(cfg)


# ----- dummy weights from a bare config ----------------------------------------------------


def tiny_config(**overrides: Any) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "vocab_size": 2048,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 128,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "eos_token_id": 2,
        **overrides,
    }


def test_dummy_weights_from_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_config()))
    llm = open_llm(path, dummy_weights=True)
    assert llm.model_name == "tiny"
    prompts: list[Prompt] = ["Hello", [5, 6, 7]]
    out = llm.generate(prompts, GREEDY)
    for o in out:
        assert len(o.token_ids) == 4 and o.finish_reason == "length"
        assert isinstance(o.text, str)  # the demo tokenizer fits a 2048 vocabulary
    again = open_llm(path, dummy_weights=True).generate(prompts, GREEDY)
    assert [o.token_ids for o in again] == [o.token_ids for o in out]  # seeded weights


def test_config_file_without_dummy_weights_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_config()))
    message = load_error(path)
    assert "tiny.json" in message and "dummy" in message


def test_dummy_weights_with_a_small_vocabulary_has_no_text(tmp_path: Path) -> None:
    path = tmp_path / "small.json"
    path.write_text(json.dumps(tiny_config(vocab_size=500)))
    llm = open_llm(path, dummy_weights=True)
    out = llm.generate([[5, 6, 7]], GREEDY)[0]
    assert out.text is None and len(out.token_ids) == 4
    assert all(0 <= t < 500 for t in out.token_ids)
    with pytest.raises(ValueError, match=r"\bprompt\b"):
        llm.generate("text needs a tokenizer", GREEDY)


def test_dummy_weights_ignore_a_checkpoints_weights(broken: Callable[[str], Path]) -> None:
    path = broken("single")
    (path / "model.safetensors").unlink()
    out = open_llm(path, dummy_weights=True).generate("Hello", GREEDY)[0]
    assert len(out.token_ids) == 4


def test_parameters_are_created_in_the_serving_dtype(pristine: dict[str, Path]) -> None:
    """No float32 copy of any weight matrix along the way: one would double the peak memory of
    loading and stay in the CUDA allocator's cache, shrinking the KV pool sized after it."""
    cfg = resolve_model(str(pristine["single"]), dummy_weights=False).config
    created: list[tuple[str, torch.dtype, int]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                created.append((str(func), out.dtype, out.numel()))
            return out

    with Record():
        model = build_model(cfg, torch.bfloat16, torch.device("cpu"), max_positions=8)
    assert torch.get_default_dtype() == torch.float32, "the default dtype was not restored"
    params = list(model.parameters())
    assert params and all(p.dtype == torch.bfloat16 for p in params)
    smallest_matrix = min(p.numel() for p in params if p.dim() == 2)
    in_float32 = [c for c in created if c[1] == torch.float32 and c[2] >= smallest_matrix]
    assert not in_float32, f"weight-sized float32 tensors created: {in_float32[:3]}"
