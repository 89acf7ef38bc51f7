"""Mixture-of-experts models (Qwen3-MoE, Mixtral) against HF transformers, on the CPU.

Tiny random checkpoints written to disk in HF's layout (one tensor per expert and projection,
Mixtral's under `block_sparse_moe` with w1/w3/w2) go through our loader, which stacks them
into one weight per projection, and the torch MoE path (a loop over the experts). Float32 on
both sides: greedy tokens identical and every step's log-softmax within LOGPROB_ATOL, in one
batch of ragged prompts and with chunked prefill; two tensor-parallel ranks (gloo) compute
what one does. The config fields that decide which layers are sparse and how routing weights
are normalised are checked from config.json, the presets with the real models' values.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from minisgl.layers.moe import SparseMoE
from minisgl.llm import LLM
from minisgl.models.config import ModelConfig
from minisgl.models.errors import ModelLoadError
from minisgl.models.source import resolve_model
from minisgl.sampling_params import SamplingParams
from tests.helpers.checkpoints import MOE_VARIANTS, load_hf, make_checkpoint
from tests.helpers.engine_util import assert_idle

VOCAB = 2048
PROMPT_LENS = (1, 6, 17, 40)
MAX_NEW = 10
LOGPROB_ATOL = 1e-4  # float32 both sides, as in test_parity.py


@pytest.fixture(scope="module", params=list(MOE_VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, variant: str) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("moe") / variant, variant, seed=7)


@pytest.fixture(scope="module")
def hf_model(ckpt: Path) -> Any:
    return load_hf(ckpt)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(99)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def _greedy(**extra: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW, ignore_eos=True, **extra)


def _hf_logsoftmax(hf_model: Any, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """HF's log-softmax, teacher-forced, before each generated token: [MAX_NEW, VOCAB]."""
    seq = torch.tensor([prompt + generated[:-1]])
    with torch.no_grad():
        logits = hf_model(input_ids=seq).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prompt) - 1 :]


def test_the_checkpoint_has_what_the_model_needs(ckpt: Path, variant: str) -> None:
    """The tiny model really is sparse where meant (so the parity below exercises routing)."""
    cfg = ModelConfig.from_dict(json.loads((ckpt / "config.json").read_text()))
    assert (cfg.num_experts, cfg.num_experts_per_tok) == (8, 2)
    if variant == "qwen3-moe":
        assert cfg.moe_layers == (0, 2) and cfg.norm_topk_prob is False and cfg.qk_norm
        assert cfg.moe_intermediate_size == 32
    else:
        assert cfg.moe_layers == (0, 1) and cfg.norm_topk_prob is True and not cfg.qk_norm
        assert cfg.moe_intermediate_size == 48


def test_greedy_and_logprobs_match_hf(
    ckpt: Path, hf_model: Any, prompts: list[list[int]], variant: str
) -> None:
    """All prompts in one ragged batch: HF's tokens, and HF's full distribution at every step."""
    llm = LLM(str(ckpt), page_size=4, progress=False)
    outs = llm.generate(prompts, _greedy(logprobs=True, top_logprobs=VOCAB))
    assert_idle(llm)
    for p, out in zip(prompts, outs, strict=True):
        assert out.top_logprobs is not None and len(out.token_ids) == MAX_NEW
        ref = _hf_logsoftmax(hf_model, p, out.token_ids)
        assert out.token_ids == ref.argmax(dim=-1).tolist(), "greedy tokens differ from HF"
        ours = torch.full((MAX_NEW, VOCAB), float("nan"))
        for step, top in enumerate(out.top_logprobs):
            ours[step, [t for t, _ in top]] = torch.tensor([lp for _, lp in top])
        torch.testing.assert_close(ours, ref, atol=LOGPROB_ATOL, rtol=0.0)
    # The tokens are not a degenerate repetition: the prompts' continuations differ.
    assert len({tuple(o.token_ids) for o in outs}) == len(outs)


def test_chunked_prefill_gives_the_same_tokens(
    ckpt: Path, hf_model: Any, prompts: list[list[int]]
) -> None:
    llm = LLM(str(ckpt), page_size=16, chunked_prefill_size=7, progress=False)
    outs = llm.generate(prompts, _greedy())
    assert_idle(llm)
    for p, out in zip(prompts, outs, strict=True):
        ref = _hf_logsoftmax(hf_model, p, out.token_ids)
        assert out.token_ids == ref.argmax(dim=-1).tolist()


@pytest.mark.slow
def test_two_ranks_compute_what_one_does(ckpt: Path, prompts: list[list[int]]) -> None:
    """Each rank holds every expert with half of its intermediate features (gloo, CPU)."""
    params = _greedy(logprobs=True)
    opts: dict[str, Any] = {"progress": False, "page_size": 4, "chunked_prefill_size": 16}
    runs = []
    for tp in (1, 2):
        with LLM(str(ckpt), tp_size=tp, **opts) as llm:
            runs.append(llm.generate(prompts, params))
    for a, b in zip(*runs, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_experts_are_stacked_from_the_checkpoint(ckpt: Path, hf_model: Any, variant: str) -> None:
    """Our stacked weights hold each HF expert's gate, up and down matrices in place."""
    llm = LLM(str(ckpt), page_size=4, progress=False)
    ours = llm.runner.model.model.layers[0].mlp
    assert isinstance(ours, SparseMoE)
    hf_mlp = hf_model.model.layers[0].mlp
    # transformers >= 5 fuses the experts itself: gate_up_proj [E, 2I, H], down_proj [E, H, I].
    assert torch.equal(ours.experts.gate_up_proj, hf_mlp.experts.gate_up_proj)
    assert torch.equal(ours.experts.down_proj, hf_mlp.experts.down_proj)
    assert torch.equal(ours.gate.weight, hf_mlp.gate.weight)


def test_a_missing_expert_tensor_is_named(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = make_checkpoint(tmp_path / "m", "mixtral", seed=1)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"1 tensors missing .*layers\.1\.mlp\.experts\.5"):
        LLM(str(path), progress=False)


def test_tensor_parallel_needs_the_expert_features_to_split(tmp_path: Path) -> None:
    # 4 kv heads and 64 dense features split over 4 ranks, 30 expert features do not.
    path = make_checkpoint(
        tmp_path / "m", "qwen3-moe", seed=1, num_key_value_heads=4, moe_intermediate_size=30
    )
    with pytest.raises(ValueError, match=r"moe_intermediate_size \(30\) is not divisible"):
        LLM(str(path), tp_size=4, progress=False)


# ----- config parsing ----------------------------------------------------------------------

QWEN3_MOE: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "vocab_size": 2048,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 32,
}


def test_qwen3_moe_sparse_layers_follow_step_and_mlp_only_layers() -> None:
    cfg = ModelConfig.from_dict({**QWEN3_MOE, "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert cfg.moe_layers == (1, 5)  # (i + 1) % 2 == 0, less layer 3
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]
    assert cfg.norm_topk_prob is False  # HF's default
    # No experts: a dense Qwen3-MoE config.
    assert ModelConfig.from_dict({**QWEN3_MOE, "num_experts": 0}).moe_layers == ()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
        ({"num_experts_per_tok": 17}, "num_experts_per_tok"),
        ({"moe_intermediate_size": None}, "moe_intermediate_size"),
        ({"decoder_sparse_step": 0}, "decoder_sparse_step"),
        ({"num_experts": "8"}, "num_experts"),
        ({"mlp_only_layers": "1,2"}, "mlp_only_layers"),
        ({"use_sliding_window": True}, "sliding-window"),
    ],
)
def test_bad_moe_fields_are_named(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ModelLoadError, match=re.escape(field)):
        ModelConfig.from_dict({**QWEN3_MOE, **change}, "cfg.json")


def test_mixtral_with_a_sliding_window_is_refused() -> None:
    raw = {**QWEN3_MOE, "architectures": ["MixtralForCausalLM"], "sliding_window": 64}
    raw["max_position_embeddings"] = 4096
    with pytest.raises(ModelLoadError, match="sliding_window=64"):
        ModelConfig.from_dict(raw)


def test_presets_carry_the_real_configs() -> None:
    qwen = resolve_model("qwen3-30b-a3b", True).config
    assert qwen.architecture == "Qwen3MoeForCausalLM" and qwen.qk_norm
    assert (qwen.num_experts, qwen.num_experts_per_tok, qwen.moe_intermediate_size) == (128, 8, 768)
    assert qwen.norm_topk_prob is True and qwen.moe_layers == tuple(range(48))
    assert (qwen.hidden_size, qwen.num_heads, qwen.num_kv_heads) == (2048, 32, 4)
    assert qwen.head_dim == 128 and qwen.num_layers == 48
    mixtral = resolve_model("mixtral-8x7b", True).config
    assert mixtral.architecture == "MixtralForCausalLM" and not mixtral.qk_norm
    assert (mixtral.num_experts, mixtral.num_experts_per_tok) == (8, 2)
    assert mixtral.moe_intermediate_size == 14336 and mixtral.norm_topk_prob is True
    assert mixtral.moe_layers == tuple(range(32)) and mixtral.vocab_size == 32000
