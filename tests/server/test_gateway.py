"""The OpenAI-compatible gateway: a real server, a real gateway process, raw HTTP and the
official `openai` client, compared with the gRPC API."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.helpers.gateway_util import http_status, run_gateway
from tests.helpers.server_util import REPO, Server, free_port, run_server, wait_idle, wait_until

from minisgl_client import Client  # isort: skip

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("gw-server"), "--max-model-len", "256") as s:
        yield s


@pytest.fixture(scope="module")
def gateway(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with run_gateway(server, tmp_path_factory.mktemp("gateway")) as url:
        yield url


def _post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


def _events(raw: bytes) -> list[Any]:
    """The data payloads of a server-sent event stream ("[DONE]" kept as a string)."""
    lines = raw.decode().split("\n\n")
    assert lines[-1] == "", "the stream must end with a blank line"
    out = []
    for event in lines[:-1]:
        assert event.startswith("data: "), event
        payload = event.removeprefix("data: ")
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


@pytest.fixture()
def grpc_client(server: Server) -> Iterator[Client]:
    with server.client() as c:
        yield c


def test_completion_matches_grpc_generate(gateway: str, grpc_client: Client) -> None:
    status, raw = _post(
        gateway + "/v1/completions",
        {"model": "minisgl-demo", "prompt": "Hello there", "max_tokens": 9, "temperature": 0},
    )
    assert status == 200, raw
    body = json.loads(raw)
    want = grpc_client.generate("Hello there", max_new_tokens=9, temperature=0.0)
    assert body["object"] == "text_completion" and body["model"] == "minisgl-demo"
    (choice,) = body["choices"]
    assert choice["text"] == want.text and choice["finish_reason"] == want.finish_reason
    assert body["usage"] == {
        "prompt_tokens": want.prompt_tokens,
        "completion_tokens": want.completion_tokens,
        "total_tokens": want.prompt_tokens + want.completion_tokens,
        "prompt_tokens_details": {
            "cached_tokens": body["usage"]["prompt_tokens_details"]["cached_tokens"]
        },
    }


def test_token_id_prompt_and_default_max_tokens(gateway: str, grpc_client: Client) -> None:
    body = {"prompt": [5, 6, 7], "temperature": 0, "n": None}  # null: the default
    status, raw = _post(gateway + "/v1/completions", body)
    assert status == 200, raw
    body = json.loads(raw)
    want = grpc_client.generate([5, 6, 7], max_new_tokens=16, temperature=0.0)
    assert body["choices"][0]["text"] == want.text
    assert body["usage"]["completion_tokens"] == want.completion_tokens <= 16


def test_streamed_completion_equals_unary_and_ends_with_done(gateway: str) -> None:
    request = {"prompt": "Once upon", "max_tokens": 20, "temperature": 0.9, "seed": 5}
    _, unary = _post(gateway + "/v1/completions", request)
    status, raw = _post(
        gateway + "/v1/completions",
        {**request, "stream": True, "stream_options": {"include_usage": True}},
        {"x-request-id": "stream-me"},
    )
    assert status == 200
    events = _events(raw)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["id"] == "stream-me" and c["object"] == "text_completion" for c in chunks)
    text_chunks = [c for c in chunks if c["choices"]]
    finishes = [c["choices"][0]["finish_reason"] for c in text_chunks]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    streamed = "".join(c["choices"][0]["text"] for c in text_chunks)
    assert streamed == json.loads(unary)["choices"][0]["text"]
    assert len(text_chunks) > 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 20


def test_n_choices_from_the_largest_seed_wrap_around(gateway: str, grpc_client: Client) -> None:
    """Choice i samples with seed + i modulo 2**63 (the server's seed range): the top of the
    range is no error, and a seed past it is a 400 naming `seed`, not a 500."""
    top = 2**63 - 1
    request = {"prompt": "Once upon", "max_tokens": 6, "temperature": 1.0, "seed": top, "n": 2}
    status, raw = _post(gateway + "/v1/completions", request)
    assert status == 200, raw
    texts = [c["text"] for c in json.loads(raw)["choices"]]
    for seed, text in zip([top, 0], texts, strict=True):
        want = grpc_client.generate("Once upon", max_new_tokens=6, temperature=1.0, seed=seed)
        assert text == want.text
    status, raw = _post(gateway + "/v1/completions", {**request, "seed": 2**64 - 1})
    assert status == 400 and json.loads(raw)["error"]["param"] == "seed", raw


def test_n_choices_unary_and_streamed(gateway: str, grpc_client: Client) -> None:
    """n choices = n requests; with a seed, choice i samples with seed + i (so they differ and
    each equals a plain gRPC call with that seed); streamed choices equal the unary ones."""
    request = {"prompt": "Once upon", "max_tokens": 10, "temperature": 1.0, "seed": 40, "n": 3}
    status, raw = _post(gateway + "/v1/completions", request)
    assert status == 200, raw
    body = json.loads(raw)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    texts = [c["text"] for c in body["choices"]]
    for i, text in enumerate(texts):
        want = grpc_client.generate("Once upon", max_new_tokens=10, temperature=1.0, seed=40 + i)
        assert text == want.text
    assert len(set(texts)) > 1
    assert body["usage"]["completion_tokens"] == 30
    assert body["usage"]["prompt_tokens"] == want.prompt_tokens

    stream = {**request, "stream": True, "stream_options": {"include_usage": True}}
    status, raw = _post(gateway + "/v1/completions", stream)
    assert status == 200
    events = _events(raw)
    assert events[-1] == "[DONE]"
    streamed = ["", "", ""]
    finished = [0, 0, 0]
    for chunk in events[:-1]:
        for c in chunk["choices"]:
            streamed[c["index"]] += c["text"]
            finished[c["index"]] += c["finish_reason"] == "length"
    assert streamed == texts and finished == [1, 1, 1]
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 30

    client = openai.OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(
        model="minisgl-demo",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        temperature=1.0,
        seed=3,
        n=2,
    )
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.usage is not None and chat.usage.completion_tokens == 12


def test_logprobs_unary_streamed_and_chat(gateway: str, grpc_client: Client) -> None:
    """Each token's text, logprob and top alternatives, as the gRPC API gives them."""
    want = grpc_client.generate(
        "Logs", max_new_tokens=7, temperature=0.0, logprobs=True, top_logprobs=2
    )
    tokens = [lp.chosen.token for lp in want.logprobs]
    assert len(tokens) == 7 and all(isinstance(t, str) for t in tokens)
    request = {"prompt": "Logs", "max_tokens": 7, "temperature": 0, "logprobs": 2}
    status, raw = _post(gateway + "/v1/completions", request)
    assert status == 200, raw
    lp = json.loads(raw)["choices"][0]["logprobs"]
    assert lp["tokens"] == tokens
    assert lp["token_logprobs"] == pytest.approx([x.chosen.logprob for x in want.logprobs])
    # (A dict by text, as OpenAI's: two ids that decode alike, e.g. to U+FFFD, share a key.)
    tops = [{t.token: pytest.approx(t.logprob) for t in x.top} for x in want.logprobs]
    assert lp["top_logprobs"] == tops
    assert lp["text_offset"] == [sum(len(t) for t in tokens[:i]) for i in range(7)]

    status, raw = _post(gateway + "/v1/completions", {**request, "stream": True})
    chunks = [c for c in _events(raw)[:-1] if c["choices"]]
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert [t for x in streamed for t in x["tokens"]] == tokens
    assert [o for x in streamed for o in x["text_offset"]] == lp["text_offset"]

    client = openai.OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    messages: Any = [{"role": "user", "content": "Logs"}]
    chat = client.chat.completions.create(
        model="minisgl-demo",
        messages=messages,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 5
    for entry in content:
        assert entry.bytes == list(entry.token.encode()) and entry.logprob <= 0
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
    plain = client.chat.completions.create(model="minisgl-demo", messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs: needs logprobs"):
        client.chat.completions.create(
            model="minisgl-demo", messages=messages, max_tokens=2, top_logprobs=2
        )


def test_chat_through_the_openai_client(gateway: str, grpc_client: Client) -> None:
    client = openai.OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
    ]
    options: dict[str, Any] = {"max_tokens": 12, "temperature": 1.0, "seed": 11}
    unary = client.chat.completions.create(model="minisgl-demo", messages=messages, **options)
    want = grpc_client.generate(messages, max_new_tokens=12, temperature=1.0, seed=11)
    assert unary.choices[0].message.role == "assistant"
    assert unary.choices[0].message.content == want.text
    assert unary.choices[0].finish_reason == want.finish_reason
    assert unary.usage is not None and unary.usage.completion_tokens == want.completion_tokens
    stream = client.chat.completions.create(
        model="minisgl-demo", messages=messages, stream=True, **options
    )
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == want.text
    parts = [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]
    with_parts = client.chat.completions.create(
        model="minisgl-demo",
        messages=[messages[0], {"role": "user", "content": parts}],  # type: ignore[list-item]
        **options,
    )
    assert with_parts.choices[0].message.content == want.text


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        ({"prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"prompt": "x", "n": 17}, 400, "n: must be an integer from 1 to 16"),
        ({"prompt": "x", "n": 0}, 400, "n: must be"),
        ({"prompt": "x", "logprobs": 21}, 400, "logprobs: must be an integer from 0 to 20"),
        ({"prompt": "x", "logprobs": "2"}, 400, "logprobs: must be an integer"),
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "x", "top_k": "5"}, 400, "top_k"),
        ({"prompt": "x", "seed": -1}, 400, "invalid option"),
        ({"prompt": "x", "ignore_eos": "yes"}, 400, "invalid option"),
        ({"prompt": "x", "model": "gpt-4"}, 404, "gpt-4"),
        ({"max_tokens": 3}, 400, "prompt"),
        ({"prompt": ["a", "b"]}, 400, "prompt"),
        ({"prompt": "x" * 3000}, 400, "context"),
    ],
)
def test_bad_requests_get_openai_error_objects(
    gateway: str, body: Any, status: int, needle: str
) -> None:
    got, raw = _post(gateway + "/v1/completions", body)
    assert got == status, raw
    err = json.loads(raw)["error"]
    assert needle in err["message"] and err["code"] == status
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_bad_chat_messages_and_the_openai_clients_error(gateway: str) -> None:
    got, raw = _post(gateway + "/v1/chat/completions", {"messages": []})
    assert got == 400 and "messages" in json.loads(raw)["error"]["message"]
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    got, raw = _post(
        gateway + "/v1/chat/completions", {"messages": [{"role": "user", "content": image}]}
    )
    assert got == 400 and "text parts" in json.loads(raw)["error"]["message"]
    client = openai.OpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="minisgl-demo", prompt="x", temperature=-2)


def test_models_and_health(gateway: str) -> None:
    with urllib.request.urlopen(gateway + "/v1/models", timeout=10) as r:
        models = json.loads(r.read())
    assert [m["id"] for m in models["data"]] == ["minisgl-demo"]
    assert models["data"][0]["max_model_len"] == 256
    assert http_status(gateway + "/health") == 200
    assert http_status(gateway + "/v1/nothing") == 404


def test_client_disconnect_mid_stream_aborts_the_request(
    gateway: str, server: Server, grpc_client: Client
) -> None:
    host, port = gateway.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"prompt": "go on", "max_tokens": 240, "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"x-request-id": "hang-up"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")
    conn.close()  # hang up mid-stream
    wait_until(lambda: "aborting hang-up" in server.log(), 15, "the abort in the server log")
    wait_idle(grpc_client)
    time.sleep(0.1)
    assert grpc_client.load().inflight_requests == 0


def test_a_server_failure_mid_stream_ends_the_stream_with_an_error_event(
    tmp_path: Path,
) -> None:
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(run_server(tmp_path / "server", "--max-model-len", "512"))
        url = stack.enter_context(run_gateway(server, tmp_path))
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        body = {"prompt": "go", "max_tokens": 400, "ignore_eos": True, "stream": True}
        conn.request("POST", "/v1/completions", json.dumps(body))
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        os.kill(server.worker_pids()["scheduler"], signal.SIGKILL)
        rest = resp.read()  # the stream must end, not hang
        conn.close()
    events = [line for line in rest.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == 500 and error["type"] == "internal_error"


def test_concurrent_streams_each_match_their_unary_reply(gateway: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def request(i: int, stream: bool) -> str:
        body = {
            "messages": [{"role": "user", "content": f"Question {i}: " + "why? " * (i % 5)}],
            "max_tokens": 10 + i % 7,
            "temperature": 0.8,
            "seed": 100 + i,
            "stream": stream,
        }
        status, raw = _post(gateway + "/v1/chat/completions", body)
        assert status == 200, raw
        if not stream:
            return str(json.loads(raw)["choices"][0]["message"]["content"])
        chunks = [e for e in _events(raw) if e != "[DONE]" and e["choices"]]
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)

    n = 24
    with ThreadPoolExecutor(n) as pool:
        streamed = list(pool.map(lambda i: request(i, True), range(n)))
    unary = [request(i, False) for i in range(n)]
    assert streamed == unary
    assert len(set(unary)) > n // 2, "seeds should make the replies differ"


def _request(
    url: str, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP request: (status, headers, body)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(method, path, body, headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _error(status: int, headers: dict[str, str], raw: bytes) -> dict[str, Any]:
    """The OpenAI error object of an error response, checked for its shape."""
    assert headers["Content-Type"].startswith("application/json"), (headers, raw)
    body = json.loads(raw)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    err: dict[str, Any] = body["error"]
    assert err["code"] == status and isinstance(err["message"], str) and err["message"]
    return err


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "needle"),
    [
        ("GET", "/v1/nothing", b"", {}, 404, "no route GET /v1/nothing"),
        ("POST", "/v1/completions/", b"{}", {}, 404, "no route"),
        ("GET", "/v1/completions", b"", {}, 405, "method GET is not allowed"),
        ("DELETE", "/v1/chat/completions", b"", {}, 405, "not allowed"),
        ("POST", "/v1/models", b"{}", {}, 405, "not allowed"),
        ("POST", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', {}, 400, "NaN"),
        ("POST", "/v1/completions", b'{"prompt": "x", "top_p": 1e999}', {}, 400, "range"),
        ("POST", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, {}, 400, "not valid JSON"),
        ("POST", "/v1/completions", b'{"prompt": "\xff"}', {}, 400, "not valid JSON"),
        ("POST", "/v1/completions", b"", {}, 400, "not valid JSON"),
        ("POST", "/v1/completions", b"[1]", {}, 400, "a JSON object"),
        ("POST", "/v1/completions", b'{"prompt": "x"}', {"x-request-id": "\xe9"}, 400, "ASCII"),
        ("POST", "/v1/completions", b"{}", {"Content-Encoding": "gzip"}, 400, "could not be read"),
        (  # a wrong charset or content type does not matter: the body is JSON (curl -d)
            "POST",
            "/v1/completions",
            b'{"prompt": "x", "max_tokens": 1}',
            {"Content-Type": "text/plain; charset=bogus"},
            200,
            "",
        ),
    ],
)
def test_every_error_response_is_an_openai_json_body(
    gateway: str,
    method: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    needle: str,
) -> None:
    got, resp_headers, raw = _request(gateway, method, path, body, headers)
    assert got == status, raw
    if status == 200:
        return
    err = _error(got, resp_headers, raw)
    assert needle in err["message"]
    assert err["type"] == {404: "not_found_error"}.get(status, "invalid_request_error")
    if status == 405:
        assert resp_headers["Allow"] in ("POST", "GET, HEAD")


def test_a_body_over_the_limit_is_a_413_error_object(gateway: str) -> None:
    """Declared too long (refused before reading), and chunked past the limit (refused while
    reading): both an OpenAI error object."""
    from minisgl.gateway import MAX_BODY_BYTES

    host, port = gateway.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
    conn.endheaders(b'{"prompt": "')
    resp = conn.getresponse()
    err = _error(resp.status, dict(resp.getheaders()), resp.read())
    conn.close()
    assert resp.status == 413 and str(MAX_BODY_BYTES) in err["message"]

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        piece = b"x" * 2**20
        for _ in range(MAX_BODY_BYTES // len(piece) + 1):
            yield piece
        yield b'"}'

    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", chunks(), encode_chunked=True)
    resp = conn.getresponse()
    err = _error(resp.status, dict(resp.getheaders()), resp.read())
    conn.close()
    assert resp.status == 413 and err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("route", "extra", "param", "needle"),
    [  # rejected by the server; the error names the OpenAI field, not the gRPC path
        ("completions", {"temperature": -1}, "temperature", "temperature: must be >= 0"),
        ("completions", {"top_p": 2}, "top_p", "top_p: must be in (0, 1]"),
        ("completions", {"presence_penalty": 3}, "presence_penalty", "presence_penalty:"),
        ("completions", {"repetition_penalty": 0}, "repetition_penalty", "repetition_penalty:"),
        ("completions", {"max_tokens": 2000}, "max_tokens", "context length"),
        ("chat", {"max_completion_tokens": 2000}, "max_completion_tokens", "context length"),
        ("completions", {"max_tokens": 2, "min_tokens": 3}, "min_tokens", "min_tokens:"),
        ("completions", {"stop": [""]}, "stop", "stop:"),
        ("completions", {"stop_token_ids": [10**6]}, "stop_token_ids", "stop_token_ids:"),
        ("completions", {"prompt": [10**6]}, "prompt", "prompt"),
        ("completions", {"prompt": "x" * 3000}, "prompt", "context"),
        ("chat", {"messages": [{"role": "user", "content": "x" * 9000}]}, "messages", "messages"),
    ],
)
def test_server_field_errors_name_the_openai_param(
    gateway: str, route: str, extra: dict[str, Any], param: str, needle: str
) -> None:
    base: dict[str, Any] = (
        {"messages": [{"role": "user", "content": "hi"}]} if route == "chat" else {"prompt": "x"}
    )
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    status, headers, raw = _request(gateway, "POST", path, json.dumps({**base, **extra}).encode())
    assert status == 400, raw
    err = _error(status, headers, raw)
    assert err["param"] == param and needle in err["message"], err
    assert not any(p in err["message"] for p in ("sampling.", "stopping.", "output.")), err


_WRONG_VALUES: list[Any] = [
    True,
    0,
    -1,
    1.5,
    1e300,
    2**64,
    "x",
    "",
    [],
    ["x"],
    [1],
    [[1]],
    {},
    {"a": 1},
    {"type": "text"},
    [{"role": "user", "content": 5}],
    [{"role": 5, "content": "x"}],
    [{"role": "user", "content": [{"type": "text", "text": 5}]}],
    [{"role": "user", "content": "x", "extra": 1}],
    [{"role": "x" * 100, "content": "x"}],
    "\ud800",  # a lone surrogate: valid JSON, not text
    [{"role": "user", "content": "\udc00"}],
]
_FIELDS = {
    "completions": ["prompt", "suffix", "echo", "best_of"],
    "chat": ["messages", "top_logprobs", "tools", "tool_choice", "response_format"],
    "both": [
        "model",
        "n",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "stop",
        "logprobs",
        "min_tokens",
        "ignore_eos",
        "stop_token_ids",
        "skip_special_tokens",
        "include_stop_str_in_output",
        "logit_bias",
        "user",
        "metadata",
        "store",
    ],
}


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_a_wrong_type_in_any_field_is_a_4xx_naming_it_never_a_500(gateway: str, route: str) -> None:
    """Every request field, in turn, gets each of a set of wrong (or odd) values: the answer is
    a success or a 4xx error object whose param is that field, never a 500."""
    from concurrent.futures import ThreadPoolExecutor

    chat = route == "chat"
    base: dict[str, Any] = {"max_tokens": 1}
    base.update({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "x"})
    path = "/v1/chat/completions" if chat else "/v1/completions"
    cases = [(k, v) for k in [*_FIELDS[route], *_FIELDS["both"]] for v in _WRONG_VALUES]

    def post(case: tuple[str, Any]) -> tuple[str, Any, int, dict[str, Any] | None]:
        key, value = case
        status, headers, raw = _request(
            gateway, "POST", path, json.dumps({**base, key: value}).encode()
        )
        return key, value, status, None if status == 200 else _error(status, headers, raw)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(post, cases))
    for key, value, status, err in results:
        assert status in (200, 400, 404), (key, value, status, err)
        if err is not None:
            assert err["param"] == key, (key, value, err)
    assert sum(status == 200 for *_, status, _ in results) > 20  # the odd but valid ones ran


@pytest.mark.parametrize(
    ("route", "field", "value"),
    [
        ("chat", "logit_bias", {"5": 10}),
        ("completions", "logit_bias", {"5": 10}),
        ("chat", "tools", [{"type": "function", "function": {"name": "f"}}]),
        ("chat", "tool_choice", "auto"),
        ("chat", "functions", [{"name": "f"}]),
        ("chat", "function_call", "auto"),
        ("chat", "parallel_tool_calls", True),
        ("chat", "audio", {"voice": "alloy", "format": "wav"}),
        ("chat", "modalities", ["text", "audio"]),
        ("chat", "prediction", {"type": "content", "content": "x"}),
        ("chat", "reasoning_effort", "high"),
        ("chat", "verbosity", "low"),
        ("chat", "web_search_options", {}),
        ("chat", "service_tier", "flex"),
        ("completions", "echo", True),
        ("completions", "suffix", "tail"),
        ("completions", "best_of", 3),
        ("completions", "use_beam_search", True),  # any other field: unrecognized
        ("chat", "prompt", "x"),
        ("chat", "echo", True),
    ],
)
def test_unsupported_parameters_are_a_400_naming_them(
    gateway: str, route: str, field: str, value: Any
) -> None:
    chat = route == "chat"
    base: dict[str, Any] = (
        {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "x"}
    )
    path = "/v1/chat/completions" if chat else "/v1/completions"
    status, headers, raw = _request(
        gateway, "POST", path, json.dumps({**base, field: value}).encode()
    )
    assert status == 400, raw
    err = _error(status, headers, raw)
    assert err["param"] == field and "not supported" in err["message"], err
    assert err["message"].startswith(f"{field}:")


def test_unsupported_message_fields_and_stream_options_are_a_400(gateway: str) -> None:
    for message in (
        {"role": "user", "content": "hi", "name": "bob"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
    ):
        status, headers, raw = _request(
            gateway, "POST", "/v1/chat/completions", json.dumps({"messages": [message]}).encode()
        )
        err = _error(status, headers, raw)
        assert status == 400 and err["param"] == "messages", err
    for opts, stream in (
        ({"continuous_usage_stats": True}, True),
        ({"include_usage": True}, False),
    ):
        body = {"prompt": "x", "stream": stream, "stream_options": opts}
        status, headers, raw = _request(
            gateway, "POST", "/v1/completions", json.dumps(body).encode()
        )
        err = _error(status, headers, raw)
        assert status == 400 and err["param"] == "stream_options", err


def test_no_op_values_and_output_neutral_fields_are_accepted(gateway: str) -> None:
    """Fields whose value asks for nothing, and fields that do not change the output (user,
    metadata, store, ...), change nothing: the reply equals a plain one."""
    plain = {"messages": [{"role": "user", "content": "Same?"}], "max_tokens": 8, "temperature": 0}
    extras = {
        "logit_bias": {},
        "response_format": {"type": "text"},
        "tools": [],
        "tool_choice": "none",
        "modalities": ["text"],
        "service_tier": "auto",
        "user": "u-1",
        "metadata": {"k": "v"},
        "store": False,
        "prompt_cache_key": "k",
        "safety_identifier": "s",
        "parallel_tool_calls": None,
    }
    replies = []
    for body in (plain, {**plain, **extras}):
        status, raw = _post(gateway + "/v1/chat/completions", body)
        assert status == 200, raw
        replies.append(json.loads(raw)["choices"][0]["message"]["content"])
    assert replies[0] == replies[1]
    body = {"prompt": "Same?", "max_tokens": 8, "temperature": 0}
    status, raw = _post(gateway + "/v1/completions", body)
    status2, raw2 = _post(
        gateway + "/v1/completions", {**body, "echo": False, "suffix": "", "best_of": 1}
    )
    assert status == status2 == 200, raw2
    assert json.loads(raw)["choices"][0]["text"] == json.loads(raw2)["choices"][0]["text"]


@pytest.fixture(scope="module")
def long_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with the demo's full context (2048): requests that surely run for seconds."""
    with run_server(tmp_path_factory.mktemp("gw-long-server")) as s:
        yield s


@pytest.fixture(scope="module")
def long_gateway(long_server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with run_gateway(long_server, tmp_path_factory.mktemp("long-gateway")) as url:
        yield url


def test_a_request_id_already_in_flight_is_a_409(long_gateway: str, long_server: Server) -> None:
    """While a call with x-request-id "twice" runs (2,000 tokens: seconds, far longer than the
    server waits for an id to be released), another with that id is a 409 error object."""
    host, port = long_gateway.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"prompt": "go on", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"x-request-id": "twice"})
    resp = conn.getresponse()
    try:
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        status, headers, raw = _request(
            long_gateway, "POST", "/v1/completions", b'{"prompt": "x"}', {"x-request-id": "twice"}
        )
        err = _error(status, headers, raw)
        assert status == 409 and err["type"] == "conflict_error" and "twice" in err["message"]
    finally:
        conn.close()
    with long_server.client() as c:
        wait_idle(c)


def test_every_grpc_status_maps_to_a_chosen_http_status() -> None:
    import grpc

    from minisgl.gateway.errors import _STATUS

    assert set(_STATUS) == set(grpc.StatusCode) - {grpc.StatusCode.OK}
    want = {
        "INVALID_ARGUMENT": 400,
        "UNAUTHENTICATED": 401,
        "NOT_FOUND": 404,
        "ALREADY_EXISTS": 409,
        "RESOURCE_EXHAUSTED": 429,
        "UNAVAILABLE": 503,
        "DEADLINE_EXCEEDED": 504,
        "INTERNAL": 500,
        "UNKNOWN": 500,
    }
    assert {name: _STATUS[grpc.StatusCode[name]][0] for name in want} == want


def test_client_disconnect_from_a_non_streaming_request_aborts_it(
    long_gateway: str, long_server: Server
) -> None:
    """The HTTP client of a long unary request (2,000 tokens) hangs up: the server aborts the
    request (its log says so, it leaves the load, its KV pages are released) at once instead
    of running it out."""
    with long_server.client() as grpc_client:
        wait_idle(grpc_client)
        host, port = long_gateway.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        body = {"prompt": "go on", "max_tokens": 2000, "ignore_eos": True}
        headers = {"x-request-id": "unary-hang-up"}
        conn.request("POST", "/v1/completions", json.dumps(body), headers)
        wait_until(lambda: grpc_client.load().running_requests == 1, 15, "the request to run")
        conn.close()  # hang up before the reply
        wait_until(
            lambda: "aborting unary-hang-up" in long_server.log(), 10, "the abort in the log"
        )
        load = wait_idle(grpc_client, timeout=10)
        assert load.inflight_requests == 0 and load.kv_cache_busy == 0.0


def _gateway_cmd(*flags: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "minisgl.cli", "gateway", *flags],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_a_busy_port_or_a_bad_host_is_one_clear_line_and_exit_2() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = [
            (("--port", str(port)), "in use"),
            (("--host", "192.0.2.1", "--port", str(port)), "not an address of this machine"),
            (("--host", "a..b"), "cannot resolve"),
        ]
        for flags, needle in cases:
            out = _gateway_cmd("--target", "127.0.0.1:1", *flags)
            assert out.returncode == 2, (flags, out.stderr)
            lines = out.stderr.strip().splitlines()
            assert len(lines) == 1 and needle in lines[0], (flags, out.stderr)
            assert "Traceback" not in out.stderr and out.stdout == ""


def test_a_server_that_is_not_there_is_a_503_error_object() -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    target = f"127.0.0.1:{free_port()}"  # nothing listens there
    cmd = [sys.executable, "-m", "minisgl.cli", "gateway", "--target", target]
    proc = subprocess.Popen([*cmd, "--port", str(port)], env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_status(url + "/health") == 503, 60, "the gateway to answer")
        status, headers, raw = _request(url, "POST", "/v1/completions", b'{"prompt": "x"}')
        err = _error(status, headers, raw)
        assert status == 503 and err["type"] == "service_unavailable"
    finally:
        proc.terminate()
        proc.wait(20)
