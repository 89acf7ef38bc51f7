"""Request validation in-process: the frontend's `server/convert.py` (what needs no token
count) and `tokenizer.check_prompt` (the token ids, once known: in the tokenizer worker and in
`LLM.submit`), plus convert's proto builders and the typed wire values. No server here;
tests/server/test_server.py sends bad requests to a live one."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from minisgl.cli import build_parser
from minisgl.ipc import transport
from minisgl.ipc.messages import (
    Delta,
    DeltaBatch,
    GenerateReq,
    ModelInfo,
    NewReq,
    ReqError,
    StepOut,
    TokenizeResult,
    TokenOut,
)
from minisgl.llm import LLM
from minisgl.models.source import DEMO_DIR
from minisgl.sampling_params import SamplingParams
from minisgl.server import convert
from minisgl.server.config import RequestLimits
from minisgl.tokenizer.tokenizer import Tokenizer, check_prompt, load_tokenizer
from minisgl.tokenizer.worker import tokenizer_reply
from minisgl.v1 import common_pb2, generation_pb2

CONTEXT = 256
VOCAB = 2048  # the demo model's
_P = common_pb2.Prompt(text="hello")


def _info(context_length: int = CONTEXT) -> ModelInfo:
    return ModelInfo(
        model="demo", architecture="llama", context_length=context_length, vocab_size=VOCAB,
        eos_token_ids=[2], has_tokenizer=True, dtype="float32", device="cpu",
        attention_backend="torch", page_size=16, kv_cache_tokens=4096, radix_cache=True,
        chunked_prefill_size=256, max_running_requests=8,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(DEMO_DIR)


@pytest.fixture(scope="module")
def llm() -> Iterator[LLM]:
    with LLM(progress=False, num_pages=64, max_model_len=CONTEXT) as engine:
        yield engine


def _request(prompt: common_pb2.Prompt = _P, **stopping: Any) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(prompt=prompt, stopping=stopping)


def _ids(ids: list[int]) -> common_pb2.Prompt:
    return common_pb2.Prompt(token_ids={"ids": ids})


# ----- where each check happens -------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "stopping", "field_name", "why"),
    [
        ([], {}, "prompt.token_ids", "must contain at least one token"),
        ([5, VOCAB], {}, "prompt.token_ids", f"id {VOCAB} is not in the vocabulary"),
        ([2**32 - 1], {}, "prompt.token_ids", "is not in the vocabulary"),
        ([5] * CONTEXT, {}, "prompt.token_ids", f"reach the context length {CONTEXT}"),
        ([5] * 100, {"max_new_tokens": CONTEXT - 99}, "stopping.max_new_tokens", "exceed"),
    ],
)
def test_token_id_prompts_pass_convert_and_are_checked_once_by_the_tokenizer(
    tok: Tokenizer, ids: list[int], stopping: dict[str, int], field_name: str, why: str
) -> None:
    """convert needs no token count, so it leaves the ids to the tokenizer worker, which
    rejects them (INVALID_ARGUMENT naming the field) before the scheduler sees them."""
    msg = convert.to_generate_req(_request(_ids(ids), **stopping), "9", _info())
    assert msg.token_ids == ids
    reply = tokenizer_reply(tok, msg, VOCAB, CONTEXT)
    assert isinstance(reply, ReqError), reply
    assert (reply.rid, reply.code) == ("9", "invalid_argument")
    assert reply.message.startswith(field_name + ": ") and why in reply.message, reply.message


def test_a_prompt_that_fits_goes_to_the_scheduler_unchanged(tok: Tokenizer) -> None:
    ids = [5] * (CONTEXT - 10)
    msg = convert.to_generate_req(_request(_ids(ids), max_new_tokens=10), "3", _info())
    reply = tokenizer_reply(tok, msg, VOCAB, CONTEXT)
    assert isinstance(reply, NewReq) and reply.input_ids == ids and reply.params == msg.params
    # Without max_new_tokens, generation may stop at the context length: no error.
    msg = convert.to_generate_req(_request(_ids([5] * (CONTEXT - 1))), "4", _info())
    assert isinstance(tokenizer_reply(tok, msg, VOCAB, CONTEXT), NewReq)


def test_text_prompts_are_checked_after_tokenization(tok: Tokenizer) -> None:
    msg = convert.to_generate_req(_request(common_pb2.Prompt(text="hello " * 400)), "5", _info())
    reply = tokenizer_reply(tok, msg, VOCAB, CONTEXT)
    assert isinstance(reply, ReqError) and reply.message.startswith("prompt: "), reply
    assert f"reach the context length {CONTEXT}" in reply.message


def test_unset_fields_take_the_sampling_params_defaults() -> None:
    """The params are normalised once: an unset field is SamplingParams' default, also
    max_new_tokens on a short context (the scheduler stops at the context length)."""
    empty = generation_pb2.GenerateRequest(prompt=_P)
    for context in (CONTEXT, 64):
        msg = convert.to_generate_req(empty, "1", _info(context))
        assert msg.params == SamplingParams()
        assert not msg.strict_max_new_tokens
    msg = convert.to_generate_req(_request(max_new_tokens=7), "2", _info())
    assert msg.params.max_new_tokens == 7 and msg.strict_max_new_tokens


@pytest.mark.parametrize(
    ("ids", "max_new_tokens", "message"),
    [
        ([], None, "prompt: must contain at least one token"),
        ([0, VOCAB - 1, VOCAB], None, f"prompt: id {VOCAB} is not in the vocabulary [0, {VOCAB})"),
        ([3, -1], None, f"prompt: id -1 is not in the vocabulary [0, {VOCAB})"),
        ([1] * CONTEXT, None, f"prompt: {CONTEXT} tokens reach the context length {CONTEXT}"),
        (
            [1] * 10,
            CONTEXT - 9,
            f"stopping.max_new_tokens: prompt (10 tokens) + max_new_tokens ({CONTEXT - 9}) "
            f"exceed the context length {CONTEXT}",
        ),
    ],
)
def test_check_prompt_names_the_field(
    ids: list[int], max_new_tokens: int | None, message: str
) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        check_prompt(ids, max_new_tokens, VOCAB, CONTEXT)
    check_prompt([1] * 10, CONTEXT - 10, VOCAB, CONTEXT)  # exactly fills the context
    check_prompt([0, VOCAB - 1] * 5, None, VOCAB, CONTEXT)


@pytest.mark.parametrize("prompt", ["hello " * 400, [7] * CONTEXT, [5, VOCAB], []])
def test_offline_and_server_reject_a_prompt_with_the_same_message(
    llm: LLM, tok: Tokenizer, prompt: str | list[int]
) -> None:
    """One check for both paths: `LLM.submit` raises what the tokenizer worker answers
    (there the field of a token-id prompt is `prompt.token_ids`)."""
    msg = GenerateReq("1", None, None, None, SamplingParams(), False)
    if isinstance(prompt, str):
        msg.text = prompt
    else:
        msg.token_ids = prompt
    reply = tokenizer_reply(tok, msg, VOCAB, CONTEXT)
    assert isinstance(reply, ReqError), reply
    with pytest.raises(ValueError) as err:
        llm.submit(prompt)
    assert str(err.value) == reply.message.replace("prompt.token_ids: ", "prompt: ", 1)
    assert not llm.scheduler.waiting and not llm.has_unfinished()


# ----- typed wire values --------------------------------------------------------------------


def test_error_codes_and_finish_reasons_are_checked_on_the_wire() -> None:
    ok = ReqError("1", "internal", "boom")
    assert transport.decode(transport.encode(ok)) == ok
    for bad in (
        ReqError("1", "bogus", "x"),  # type: ignore[arg-type]
        TokenizeResult(1, error="x", code="unavailable"),  # type: ignore[arg-type]
        DeltaBatch([Delta("1", [], "", None, None, 0, 0, "eos", None)]),  # type: ignore[arg-type]
        StepOut([TokenOut("1", 1, None, None, "eos", None, 0, 0)]),  # type: ignore[arg-type]
    ):
        with pytest.raises(msgspec.ValidationError):
            transport.decode(transport.encode(bad))


# ----- proto builders -----------------------------------------------------------------------


def _delta(**fields: Any) -> Delta:
    base: dict[str, Any] = {
        "rid": "r", "token_ids": [5, 6], "text": "ab", "logprobs": None, "top": None,
        "prompt_tokens": 3, "cached_tokens": 0, "finish_reason": None, "matched_stop": None,
    }  # fmt: skip
    return Delta(**{**base, **fields})


def test_finish_pb_maps_every_reason_and_the_matched_stop() -> None:
    assert convert.finish_pb(_delta()).reason == common_pb2.FINISH_REASON_UNSPECIFIED
    length = convert.finish_pb(_delta(finish_reason="length"))
    assert length.reason == common_pb2.FINISH_REASON_LENGTH
    assert not length.HasField("stop_string") and not length.HasField("stop_token_id")
    by_string = convert.finish_pb(_delta(finish_reason="stop", matched_stop="\n\n"))
    assert (by_string.reason, by_string.stop_string) == (common_pb2.FINISH_REASON_STOP, "\n\n")
    by_id = convert.finish_pb(_delta(finish_reason="stop", matched_stop=2))
    assert (by_id.reason, by_id.stop_token_id) == (common_pb2.FINISH_REASON_STOP, 2)
    abort = convert.finish_pb(_delta(finish_reason="abort"))
    assert abort.reason == common_pb2.FINISH_REASON_ABORT


def test_logprobs_pb_pairs_each_token_with_its_text_and_alternatives() -> None:
    assert convert.logprobs_pb(_delta()) == []
    delta = _delta(
        logprobs=[-0.5, -1.0],
        top=[[(5, -0.5), (9, -2.0)], [(6, -1.0)]],
        token_texts={5: "a", 6: "b", 9: "z"},
    )
    out = convert.logprobs_pb(delta)
    assert [(x.chosen.token_id, x.chosen.logprob, x.chosen.token) for x in out] == [
        (5, -0.5, "a"),
        (6, -1.0, "b"),
    ]
    assert [(t.token_id, t.logprob, t.token) for t in out[0].top] == [
        (5, -0.5, "a"),
        (9, -2.0, "z"),
    ]
    only_top = convert.logprobs_pb(_delta(top=[[(5, -0.1)], [(6, -0.2)]]))
    assert [x.chosen.logprob for x in only_top] == [0.0, 0.0]  # logprobs not asked for


def test_bad_utf8_field_names_nested_fields() -> None:
    desc = generation_pb2.GenerateRequest.DESCRIPTOR
    good = generation_pb2.GenerateRequest(prompt=_P, request_id="x").SerializeToString()
    assert convert.bad_utf8_field(desc, good) is None
    chat = generation_pb2.GenerateRequest(
        prompt=common_pb2.Prompt(chat={"messages": [{"role": "user", "content": "MARK"}]})
    ).SerializeToString()
    broken = chat.replace(b"MARK", b"MA\xff\xfe")
    assert convert.bad_utf8_field(desc, broken) == "prompt.chat.messages.content"
    assert convert.bad_utf8_field(desc, b"\x0a\x05\x0a\x09ab") is None  # truncated: cannot tell


def test_request_ids_are_labels_of_a_safe_alphabet() -> None:
    convert.check_request_id("client-chosen.id_1:x-y")
    convert.check_request_id("x" * 128)
    for bad in ("", "a b", "x" * 129, "réq", "a/b"):
        with pytest.raises(ValueError, match=r"^request_id: "):
            convert.check_request_id(bad)


# ----- request limits -----------------------------------------------------------------------


def test_request_limits_come_from_the_server_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """The limits are RequestLimits fields, set by `minisgl serve` flags (help shows their
    defaults); at a limit a request passes, one over it gets an error naming the field."""
    flags = {"stop-strings": 2, "stop-string-chars": 3, "chat-messages": 2, "role-chars": 4}
    flags["prompt-chars"] = 10
    argv = ["serve", *(x for k, v in flags.items() for x in (f"--max-{k}", str(v)))]
    args = build_parser().parse_args(argv)
    limits = RequestLimits(*(getattr(args, "max_" + k.replace("-", "_")) for k in flags))
    assert limits == RequestLimits(2, 3, 2, 4, 10)  # the flags in the fields' order
    info = _info()

    def request(prompt: common_pb2.Prompt = _P, **stopping: Any) -> generation_pb2.GenerateRequest:
        return generation_pb2.GenerateRequest(prompt=prompt, stopping=stopping)

    def chat(*messages: tuple[str, str]) -> common_pb2.Prompt:
        return common_pb2.Prompt(
            chat={"messages": [{"role": r, "content": c} for r, c in messages]}
        )

    at_limits = request(common_pb2.Prompt(text="x" * 10), stop=["abc", "d"])
    assert convert.to_generate_req(at_limits, "r", info, limits).params.stop == ["abc", "d"]
    assert convert.prompt_parts(chat(("user", "12345"), ("sys", "67890")), info, limits)[1]
    over = [
        ("stopping.stop", request(stop=["a", "b", "c"])),
        ("stopping.stop", request(stop=["abcd"])),
        ("prompt.text", request(common_pb2.Prompt(text="x" * 11))),
        ("prompt.chat", request(chat(("user", "a"), ("user", "b"), ("user", "c")))),
        ("prompt.chat[1].role", request(chat(("user", "a"), ("robot", "b")))),
        ("prompt.chat", request(chat(("user", "12345"), ("user", "678901")))),
    ]
    for field_name, bad in over:
        with pytest.raises(ValueError, match=rf"^{re.escape(field_name)}: "):
            convert.to_generate_req(bad, "r", info, limits)
    # The defaults, as documented in the .proto and in --help.
    assert convert.to_generate_req(at_limits, "r", info).params.stop == ["abc", "d"]
    with pytest.raises(ValueError, match=r"^stopping\.stop: at most 64 "):
        convert.to_generate_req(request(stop=["s"] * 65), "r", info)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    serve_help = " ".join(capsys.readouterr().out.split())
    for flag, default in [
        ("--max-stop-strings", "64"), ("--max-stop-string-chars", "1024"),
        ("--max-chat-messages", "4096"), ("--max-role-chars", "64"),
    ]:  # fmt: skip
        assert re.search(rf"{flag} \S+ [^-]*\(default: {default}\)", serve_help), flag
    with pytest.raises(ValueError, match=r"^--max-stop-strings: must be >= 1"):
        RequestLimits(max_stop_strings=0)
