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

from tests.server_util import REPO, Server, free_port, run_server, wait_idle, wait_until

from minisgl_client import Client  # isort: skip

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("gw-server"), "--max-model-len", "256") as s:
        yield s


@contextlib.contextmanager
def run_gateway(server: Server, workdir: Path) -> Iterator[str]:
    """`minisgl gateway` in front of `server` on a free port; yields its base URL."""
    port = free_port()
    log = workdir / "gateway.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "minisgl.cli", "gateway", "--target", server.target]
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _status(url + "/health") == 200, 60, f"the gateway ({log})")
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture(scope="module")
def gateway(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with run_gateway(server, tmp_path_factory.mktemp("gateway")) as url:
        yield url


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return None


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
    assert _status(gateway + "/health") == 200
    assert _status(gateway + "/v1/nothing") == 404


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
