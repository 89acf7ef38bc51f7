"""Parity with Hugging Face transformers on tiny random checkpoints of every variant.

Both sides run float32 on CPU from the same files on disk (ours through minisgl's loader,
the reference through `transformers.AutoModelForCausalLM`), so the only differences are
rounding: observed max |log-softmax difference| is about 4e-6, while the smallest top-1 vs
top-2 log-prob margin on these prompts is about 3e-4, so greedy tokens must match exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from minisgl.attention.batch import ForwardBatch
from minisgl.llm import LLM
from minisgl.sampling_params import SamplingParams
from tests.helpers.checkpoints import VARIANTS, load_hf, make_checkpoint
from tests.helpers.engine_util import assert_idle

VOCAB = 2048
# 1: a single-token prompt; 16/17: exactly one page of 16 and one token over; 80: longer than
# llama3's original_max_position_embeddings (64). Generation crosses page boundaries as well.
PROMPT_LENS = (1, 5, 16, 17, 40, 80)
MAX_NEW = 16
# Absolute tolerance on log-probabilities (float32 both sides; ~25x the observed max 4e-6).
LOGPROB_ATOL = 1e-4

# Engine layouts that must not change a single token.
LAYOUTS: dict[str, dict[str, int]] = {
    "page4": {"page_size": 4},
    "page1": {"page_size": 1},
    "page16": {"page_size": 16},
    "page16-chunk7": {"page_size": 16, "chunked_prefill_size": 7},
    "page5-chunk7": {"page_size": 5, "chunked_prefill_size": 7},
}


def greedy(**extra: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW, ignore_eos=True, **extra)


def make_llm(path: Path, page_size: int = 4, **options: Any) -> LLM:
    # Enough pages for every prompt at once, whatever the page size.
    tokens = sum(n + MAX_NEW for n in PROMPT_LENS)
    num_pages = -(-tokens // page_size) + len(PROMPT_LENS)
    return LLM(str(path), page_size=page_size, num_pages=num_pages, progress=False, **options)


@contextmanager
def record_batches(llm: LLM) -> Iterator[list[list[int]]]:
    """Record the extend lengths (new tokens per request) of every forward step."""
    runner = llm.runner
    original = runner.forward
    seen: list[list[int]] = []

    def forward(batch: ForwardBatch) -> torch.Tensor:
        seen.append(list(batch.extend_lens_cpu))
        return original(batch)

    runner.forward = forward  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        del runner.forward  # back to the class's method


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1234)
    # Ids from 3 up: no pad/bos/eos specials in the prompts.
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(scope="module")
def ckpt(checkpoints: dict[str, Path], variant: str) -> Path:
    return checkpoints[variant]


@pytest.fixture(scope="module")
def hf_model(ckpt: Path) -> Any:
    return load_hf(ckpt)


@pytest.fixture(scope="module")
def hf_greedy(hf_model: Any, prompts: list[list[int]]) -> list[list[int]]:
    """HF's greedy continuation of each prompt (one at a time: no padding in the reference)."""
    outs: list[list[int]] = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            seq = hf_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=MAX_NEW,
                eos_token_id=None,
                pad_token_id=0,
            )
            outs.append(seq[0, len(p) :].tolist())
    assert all(len(o) == MAX_NEW for o in outs), "reference stopped early"
    return outs


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_greedy_matches_hf(
    ckpt: Path, prompts: list[list[int]], hf_greedy: list[list[int]], layout: str
) -> None:
    """All prompts in one batch give HF's greedy tokens, for every page size and chunking."""
    options = LAYOUTS[layout]
    llm = make_llm(ckpt, **options)
    with record_batches(llm) as batches:
        outs = llm.generate(prompts, greedy())
    assert [o.token_ids for o in outs] == hf_greedy
    assert [o.prompt_token_ids for o in outs] == prompts
    assert all(o.finish_reason == "length" for o in outs)
    chunk = options.get("chunked_prefill_size")
    if chunk is None:
        # Every prompt is prefilled together in the first forward (ragged batched prefill).
        assert batches[0] == list(PROMPT_LENS)
    else:
        # Prompts really were split: no request got more than `chunk` tokens in one step, and
        # a step's prefill tokens stay within the budget (decodes, one token each, run on top).
        assert max(max(b) for b in batches) <= chunk
        assert all(sum(n for n in b if n > 1) <= chunk for b in batches)
    assert_idle(llm)


def test_logprobs_match_hf(ckpt: Path, hf_model: Any, prompts: list[list[int]]) -> None:
    """The full log-softmax at every generated step (prefill, then decodes) matches HF.

    HF is run teacher-forced over prompt + our generated tokens; its log_softmax at the
    position before each generated token is the reference. Tolerance: atol LOGPROB_ATOL
    (1e-4), rtol 0, float32 on both sides.
    """
    llm = make_llm(ckpt)
    outs = llm.generate(prompts, greedy(logprobs=True, top_logprobs=VOCAB))
    assert_idle(llm)
    for p, out in zip(prompts, outs, strict=True):
        assert out.top_logprobs is not None and out.logprobs is not None
        assert len(out.token_ids) == len(out.top_logprobs) == len(out.logprobs) == MAX_NEW
        seq = torch.tensor([p + out.token_ids[:-1]])
        with torch.no_grad():
            logits = hf_model(input_ids=seq).logits[0].float()
        ref = torch.log_softmax(logits, dim=-1)[len(p) - 1 :]
        assert ref.shape == (MAX_NEW, VOCAB)
        ours = torch.full((MAX_NEW, VOCAB), float("nan"))
        for step, top in enumerate(out.top_logprobs):
            ids = [t for t, _ in top]
            lps = torch.tensor([lp for _, lp in top])
            assert sorted(ids) == list(range(VOCAB)), "top_logprobs=vocab must list every id"
            assert torch.all(lps[:-1] >= lps[1:]), "top_logprobs must be sorted"
            ours[step, ids] = lps
            # The chosen token's logprob is the same number, and greedy picked the top one.
            token = out.token_ids[step]
            assert out.logprobs[step] == ours[step, token].item()
            assert ids[0] == token
        torch.testing.assert_close(ours, ref, atol=LOGPROB_ATOL, rtol=0.0)


def test_sharded_checkpoint(tmp_path: Path, variant: str, prompts: list[list[int]]) -> None:
    """The same weights split over several safetensors shards load to the same model."""
    seed = 100 + list(VARIANTS).index(variant)
    single = make_checkpoint(tmp_path / "single", variant, seed=seed)
    sharded = make_checkpoint(tmp_path / "sharded", variant, seed=seed, max_shard_size="50KB")
    assert not (single / "model.safetensors.index.json").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) >= 3
    assert sorted(set(index["weight_map"].values())) == shards

    a, b = make_llm(single), make_llm(sharded)
    params_a = dict(a.runner.model.named_parameters())
    params_b = dict(b.runner.model.named_parameters())
    assert params_a.keys() == params_b.keys()
    for name, p in params_a.items():
        assert torch.equal(p, params_b[name]), name
    out_a = a.generate(prompts, greedy())
    out_b = b.generate(prompts, greedy())
    assert [o.token_ids for o in out_b] == [o.token_ids for o in out_a]
    assert_idle(a)
    assert_idle(b)
