"""The GGUF reader on small GGUF files written here with gguf.GGUFWriter.

Tiny random checkpoints (tests/helpers/checkpoints.py) are converted the way llama.cpp's
convert_hf_to_gguf.py does it (its tensor names, its q/k row permutation for llama, F32 norms),
then loaded through minisgl's loader and compared with the same weights loaded from the
safetensors files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quant_shape_to_byte_shape, quantize
from safetensors.torch import load_file

from minisgl.llm import LLM
from minisgl.models.errors import ModelLoadError
from minisgl.models.gguf import SUPPORTED_TENSOR_TYPES, gguf_config, gguf_tensors, unpermute_rows
from minisgl.models.source import resolve_model
from minisgl.sampling_params import SamplingParams
from tests.helpers.checkpoints import make_checkpoint

# HF name parts -> GGUF name parts, written out independently of minisgl.models.gguf.
_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_ARCH = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
PROMPTS = [[5, 17, 300, 42, 9], [1000, 3, 3, 7], list(range(40, 75))]


def gguf_name(hf: str) -> str:
    stem, _, leaf = hf.rpartition(".")
    if stem.startswith("model.layers."):
        layer, _, part = stem.removeprefix("model.layers.").partition(".")
        return f"blk.{layer}.{_LAYER[part]}.{leaf}"
    return f"{_GLOBAL[stem]}.{leaf}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (q with all heads, k with the kv heads)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(
    ckpt: Path,
    out: Path,
    qtype: str = "F32",
    drop_keys: tuple[str, ...] = (),
    extra_kv: dict[str, Any] | None = None,
    override_types: dict[str, GGMLQuantizationType] | None = None,
) -> Path:
    """Convert the safetensors checkpoint in `ckpt` to one GGUF file `out` (2-D tensors in
    `qtype`, 1-D ones in F32 as llama.cpp does)."""
    cfg = json.loads((ckpt / "config.json").read_text())
    arch = _ARCH[cfg["architectures"][0]]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    kv: dict[str, Any] = {
        f"{arch}.block_count": ("u32", cfg["num_hidden_layers"]),
        f"{arch}.context_length": ("u32", cfg["max_position_embeddings"]),
        f"{arch}.embedding_length": ("u32", cfg["hidden_size"]),
        f"{arch}.feed_forward_length": ("u32", cfg["intermediate_size"]),
        f"{arch}.attention.head_count": ("u32", heads),
        f"{arch}.attention.head_count_kv": ("u32", kv_heads),
        f"{arch}.attention.key_length": ("u32", cfg["head_dim"]),
        f"{arch}.attention.value_length": ("u32", cfg["head_dim"]),
        f"{arch}.rope.dimension_count": ("u32", cfg["head_dim"]),
        f"{arch}.attention.layer_norm_rms_epsilon": ("f32", cfg["rms_norm_eps"]),
        f"{arch}.rope.freq_base": ("f32", 10000.0),
        "tokenizer.ggml.eos_token_id": ("u32", cfg["eos_token_id"]),
    }
    kv.update(extra_kv or {})
    writer = GGUFWriter(str(out), arch)
    for key, (kind, value) in kv.items():
        if key in drop_keys:
            continue
        {"u32": writer.add_uint32, "f32": writer.add_float32, "str": writer.add_string}.get(
            kind, writer.add_array
        )(key, value)
    tensors = load_file(str(ckpt / "model.safetensors"))
    for hf, t in tensors.items():
        w = t.float().numpy()
        if arch == "llama" and hf.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, heads)
        elif arch == "llama" and hf.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, kv_heads)
        name = gguf_name(hf)
        forced = (override_types or {}).get(name)
        if forced is not None:
            shape = quant_shape_to_byte_shape(w.shape, forced)
            writer.add_tensor(name, np.zeros(shape, np.uint8), raw_dtype=forced)
        elif w.ndim == 1 or qtype == "F32":
            writer.add_tensor(name, w)
        elif qtype == "F16":
            writer.add_tensor(name, w.astype(np.float16))
        else:
            q = GGMLQuantizationType[qtype]
            writer.add_tensor(name, quantize(w, q), raw_dtype=q)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _rounded(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """What a 2-D tensor becomes after a round trip through `qtype`."""
    if w.ndim == 1 or qtype == "F32":
        return w.float()
    if qtype == "F16":
        return w.half().float()
    q = GGMLQuantizationType[qtype]
    return torch.from_numpy(dequantize(quantize(w.float().numpy(), q), q).copy())


def _params(llm: LLM) -> dict[str, torch.Tensor]:
    return dict(llm.runner.model.named_parameters(remove_duplicate=False))


def _llm(path: Path, tokenizer: Path | None = None) -> LLM:
    tok = None if tokenizer is None else str(tokenizer)
    return LLM(str(path), tokenizer=tok, dtype="float32", num_pages=64, progress=False)


VARIANT_CASES = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "qwen2-bias": ("qwen2-bias", {}),
    "qwen3-qknorm": ("qwen3-qknorm", {}),
}


@pytest.mark.parametrize("case", list(VARIANT_CASES))
def test_f32_gguf_equals_the_safetensors_checkpoint(tmp_path: Path, case: str) -> None:
    """Same parameters, same greedy tokens and logprobs as loading the safetensors files (the
    llama files carry llama.cpp's q/k permutation, which the loader must undo)."""
    variant, overrides = VARIANT_CASES[case]
    ckpt = make_checkpoint(tmp_path / "hf", variant, **overrides)
    path = write_gguf(ckpt, tmp_path / "model.gguf")
    ref, ours = _llm(ckpt), _llm(path, tokenizer=ckpt)
    assert ours.runner.model.cfg.tie_word_embeddings == ref.runner.model.cfg.tie_word_embeddings
    mine = _params(ours)
    for name, p in _params(ref).items():
        torch.testing.assert_close(mine[name], p, rtol=0, atol=0, msg=name)
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True, logprobs=True)
    want, got = ref.generate(PROMPTS, params), ours.generate(PROMPTS, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for a, b in zip(got, want, strict=True):
        assert a.logprobs is not None and b.logprobs is not None
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0", "Q4_1"])
def test_quantized_gguf_loads_the_dequantized_weights(tmp_path: Path, qtype: str) -> None:
    """Each parameter equals the safetensors weight after a round trip through `qtype`."""
    ckpt = make_checkpoint(tmp_path / "hf", "llama")
    ours = _params(_llm(write_gguf(ckpt, tmp_path / "model.gguf", qtype), tokenizer=ckpt))
    ref = load_file(str(ckpt / "model.safetensors"))
    cfg = json.loads((ckpt / "config.json").read_text())
    qkv = [
        torch.cat(
            [_rounded(ref[f"model.layers.{i}.self_attn.{p}_proj.weight"], qtype) for p in "qkv"]
        )
        for i in range(cfg["num_hidden_layers"])
    ]
    for i, fused in enumerate(qkv):
        torch.testing.assert_close(
            ours[f"model.layers.{i}.self_attn.qkv_proj.weight"], fused, rtol=0, atol=0
        )
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        torch.testing.assert_close(ours[name], _rounded(ref[name], qtype), rtol=0, atol=0)


def test_q_k_permutation_round_trip() -> None:
    """unpermute_rows inverts llama.cpp's permute for q (all heads) and k (kv heads)."""
    gen = torch.Generator().manual_seed(0)
    for heads, head_dim in ((4, 16), (9, 64), (3, 64)):
        w = torch.randn(heads * head_dim, 24, generator=gen)
        permuted = torch.from_numpy(llama_cpp_permute(w.numpy(), heads).copy())
        assert not torch.equal(permuted, w)  # it really moves rows
        assert torch.equal(unpermute_rows(permuted, heads), w)
        bias = torch.randn(heads * head_dim, generator=gen)
        assert torch.equal(
            unpermute_rows(torch.from_numpy(llama_cpp_permute(bias.numpy(), heads).copy()), heads),
            bias,
        )


@pytest.mark.parametrize("qtype", SUPPORTED_TENSOR_TYPES)
def test_every_supported_type_dequantizes(tmp_path: Path, qtype: str) -> None:
    """A tensor of each supported type comes out as float32 of its logical shape, equal to the
    gguf library's dequantization (K-quants have no quantizer in the library: their bytes are
    random, drawn below 64 so that every float16 scale in them is finite)."""
    q = GGMLQuantizationType[qtype]
    shape = (3, 512)
    rng = np.random.default_rng(0)
    if qtype in ("F32", "F16"):
        data: np.ndarray = rng.standard_normal(shape).astype(
            np.float32 if qtype == "F32" else np.float16
        )
        raw = None
    else:
        data = rng.integers(0, 64, quant_shape_to_byte_shape(shape, q), dtype=np.uint8)
        raw = q
    path = tmp_path / "one.gguf"
    writer = GGUFWriter(str(path), "qwen2")
    writer.add_tensor("blk.0.ffn_up.weight", data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cfg = resolve_model("qwen3-0.6b", True).config
    [(name, tensor)] = list(gguf_tensors(path, cfg))
    assert name == "model.layers.0.mlp.up_proj.weight"
    assert tensor.dtype == torch.float32 and tuple(tensor.shape) == shape
    want = dequantize(data.view(np.uint8) if raw is None else data, q).reshape(shape)
    assert torch.isfinite(tensor).all()
    np.testing.assert_array_equal(tensor.numpy(), want.astype(np.float32))


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "hf", "llama")
    path = write_gguf(
        ckpt,
        tmp_path / "model.gguf",
        override_types={"blk.1.ffn_down.weight": GGMLQuantizationType.MXFP4},
    )
    with pytest.raises(ModelLoadError, match=r"tensor blk\.1\.ffn_down\.weight has type MXFP4"):
        _llm(path, tokenizer=ckpt)


def test_missing_metadata_key_is_named(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "hf", "llama")
    path = write_gguf(ckpt, tmp_path / "model.gguf", drop_keys=("llama.block_count",))
    with pytest.raises(ModelLoadError, match=r"missing metadata key 'llama\.block_count'"):
        resolve_model(str(path), False)


def test_unsupported_architecture_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    writer = GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"unsupported general\.architecture 'gpt2'"):
        resolve_model(str(path), False)


def test_end_of_turn_token_of_the_chat_template_stops(tmp_path: Path) -> None:
    """eos ids: tokenizer.ggml.eos_token_id plus the end-of-turn token the template writes."""
    ckpt = make_checkpoint(tmp_path / "hf", "llama")
    tokens = [
        "<unk>",
        "<s>",
        "</s>",
        "<|im_start|>",
        "<|im_end|>",
        *[f"t{i}" for i in range(5, 2048)],
    ]
    template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    extra = {
        "tokenizer.ggml.tokens": ("array", tokens),
        "tokenizer.chat_template": ("str", template),
    }
    path = write_gguf(ckpt, tmp_path / "model.gguf", extra_kv=extra)
    assert gguf_config(path).eos_token_ids == (2, 4)


def test_directory_with_one_gguf_resolves_and_two_are_refused(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "hf", "llama")
    folder = tmp_path / "g"
    folder.mkdir()
    path = write_gguf(ckpt, folder / "a.gguf")
    source = resolve_model(str(folder), False)
    assert (source.gguf_file, source.weights_dir) == (path, folder)
    source.check_weights()
    assert resolve_model(str(folder), True).weights_dir is None
    write_gguf(ckpt, folder / "b.gguf")
    with pytest.raises(ModelLoadError, match=r"several GGUF files \(a\.gguf, b\.gguf\)"):
        resolve_model(str(folder), False)


def test_two_tensor_parallel_ranks_slice_gguf_tensors(tmp_path: Path) -> None:
    """Each rank takes its slice of the dequantized tensors: two ranks compute what one does."""
    ckpt = make_checkpoint(tmp_path / "hf", "llama", vocab_size=2047)
    path = write_gguf(ckpt, tmp_path / "model.gguf", "Q8_0")
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True, logprobs=True)
    outs = []
    for tp in (1, 2):
        with LLM(str(path), tokenizer=str(ckpt), tp_size=tp, num_pages=64, progress=False) as llm:
            outs.append(llm.generate(PROMPTS, params))
    for a, b in zip(*outs, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_a_tokenizer_that_is_not_there_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tokenizer: no such directory or \.gguf file"):
        LLM(tokenizer=str(tmp_path / "absent"), progress=False, num_pages=16)


def test_a_file_that_is_not_gguf_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match=r"broken\.gguf: not a readable GGUF file"):
        resolve_model(str(path), False)
