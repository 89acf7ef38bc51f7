"""Structured output through a real server (gRPC stubs) and the gateway (the openai client),
streaming and not, with overlap scheduling on and off: valid outputs, and bad constraints
refused naming the field while the server keeps serving."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import grpc
import jsonschema
import openai
import pytest

from minisgl.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from tests.helpers.gateway_util import run_gateway
from tests.helpers.server_util import Server, run_server, wait_idle

from minisgl_client import Client  # isort: skip

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "population": {"type": "integer", "minimum": 0, "maximum": 10**9},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["city", "population"],
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Overlap on: constrained requests take the placeholder path (tests/engine covers both).
    flags = ("--max-model-len", "512", "--overlap-schedule", "on")
    with run_server(tmp_path_factory.mktemp("structured"), *flags) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server: Server) -> Iterator[generation_pb2_grpc.GenerationServiceStub]:
    with server.channel() as ch:
        yield generation_pb2_grpc.GenerationServiceStub(ch)


@pytest.fixture(scope="module")
def client(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    with run_gateway(server, tmp_path_factory.mktemp("structured-gw")) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _request(constraint: common_pb2.Constraint, seed: int, **kw: Any) -> dict[str, Any]:
    return {
        "prompt": common_pb2.Prompt(text="A city as JSON:"),
        "sampling": common_pb2.SamplingOptions(temperature=0.8, seed=seed),
        "stopping": common_pb2.StoppingOptions(max_new_tokens=120),
        "constraint": constraint,
        **kw,
    }


def test_the_python_client_takes_constraints_as_options(server: Server) -> None:
    with Client(server.target, timeout=60) as c:
        out = c.generate("Pick:", temperature=0.8, seed=3, choice=["north", "south"])
        assert out.text in ("north", "south") and out.finish_reason == "stop"
        out = c.generate("Digits:", temperature=0.8, seed=4, regex="[0-9]{3}", max_new_tokens=16)
        assert re.fullmatch("[0-9]{3}", out.text), out.text
        deltas = list(c.stream("JSON:", seed=5, json_object=True, max_new_tokens=120))
        text = "".join(d.text for d in deltas)
        assert deltas[-1].finish_reason in ("stop", "length")  # length: possibly incomplete
        if deltas[-1].finish_reason == "stop":
            assert isinstance(json.loads(text), dict), text


def test_grpc_constraints_unary_and_streamed(
    stub: generation_pb2_grpc.GenerationServiceStub, server: Server
) -> None:
    cases = [
        (common_pb2.Constraint(json_schema=json.dumps(SCHEMA)), "json"),
        (common_pb2.Constraint(json_object=True), "object"),
        (common_pb2.Constraint(regex=r"[a-z]{1,8}-\d{2}"), "regex"),
        (common_pb2.Constraint(choice=common_pb2.Choices(choices=["left", "right"])), "choice"),
    ]
    calls = []
    for constraint, kind in cases:
        for seed in range(2):  # all at once: one batch
            fields = _request(constraint, seed)
            unary = stub.Generate.future(generation_pb2.GenerateRequest(**fields), timeout=60)
            stream = stub.StreamGenerate(generation_pb2.StreamGenerateRequest(**fields), timeout=60)
            calls.append((kind, unary, stream))
    stopped = 0
    for kind, call, stream in calls:
        unary = call.result()
        streamed = "".join(p.text for p in stream)
        assert streamed == unary.text  # same seed, same tokens
        if unary.finish.reason != common_pb2.FINISH_REASON_STOP:
            assert unary.finish.reason == common_pb2.FINISH_REASON_LENGTH
            continue
        stopped += 1
        if kind == "json":
            jsonschema.validate(json.loads(unary.text), SCHEMA)
        elif kind == "object":
            assert isinstance(json.loads(unary.text), dict)
        elif kind == "regex":
            assert re.fullmatch(r"[a-z]{1,8}-\d{2}", unary.text), unary.text
        else:
            assert unary.text in ("left", "right")
    assert stopped >= 5
    wait_idle(server.client())


@pytest.mark.parametrize(
    ("constraint", "field"),
    [
        (common_pb2.Constraint(json_schema='{"type": "bogus"}'), "constraint.json_schema"),
        (common_pb2.Constraint(json_schema="{not json"), "constraint.json_schema"),
        (common_pb2.Constraint(regex="(unclosed"), "constraint.regex"),
        (common_pb2.Constraint(grammar="root ::= missing"), "constraint.grammar"),
        (common_pb2.Constraint(choice=common_pb2.Choices()), "constraint.choice"),
        (common_pb2.Constraint(json_object=False), "constraint.json_object"),
    ],
)
def test_bad_constraints_are_invalid_argument(
    stub: generation_pb2_grpc.GenerationServiceStub, constraint: common_pb2.Constraint, field: str
) -> None:
    for make in (generation_pb2.GenerateRequest, generation_pb2.StreamGenerateRequest):
        with pytest.raises(grpc.RpcError) as e:
            call = make(**_request(constraint, 0))
            if make is generation_pb2.GenerateRequest:
                stub.Generate(call, timeout=30)
            else:
                list(stub.StreamGenerate(call, timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith(field + ":"), e.value.details()
    # Still serving, constrained and not.
    ok = stub.Generate(
        generation_pb2.GenerateRequest(
            **_request(common_pb2.Constraint(choice=common_pb2.Choices(choices=["fine"])), 1)
        ),
        timeout=30,
    )
    assert ok.text == "fine"


def test_gateway_response_format(client: openai.OpenAI) -> None:
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    stopped = 0
    for seed in range(3):
        reply = client.chat.completions.create(
            model="minisgl-demo",
            messages=[{"role": "user", "content": "A city as JSON"}],
            response_format=fmt,
            max_tokens=120,
            seed=seed,
        )
        text = reply.choices[0].message.content or ""
        chunks = client.chat.completions.create(
            model="minisgl-demo",
            messages=[{"role": "user", "content": "A city as JSON"}],
            response_format=fmt,
            max_tokens=120,
            seed=seed,
            stream=True,
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == text
        if reply.choices[0].finish_reason == "stop":
            stopped += 1
            jsonschema.validate(json.loads(text), SCHEMA)
    assert stopped >= 2
    obj = client.completions.create(
        model="minisgl-demo",
        prompt="{",
        extra_body={"response_format": {"type": "json_object"}},
        max_tokens=120,
        temperature=0,
    )
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].text), dict)


def test_gateway_bad_response_format_is_400(client: openai.OpenAI) -> None:
    bad: list[tuple[Any, str]] = [
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}},
            "response_format: does not compile: ",
        ),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "response_format"),
        ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format"),
        ({"type": "yaml"}, "response_format"),
    ]
    for fmt, field in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model="minisgl-demo",
                messages=[{"role": "user", "content": "hi"}],
                response_format=fmt,
                max_tokens=8,
            )
        assert e.value.status_code == 400 and field in str(e.value), str(e.value)
        assert e.value.param == "response_format", str(e.value)  # the server's errors too
    ok = client.chat.completions.create(
        model="minisgl-demo",
        messages=[{"role": "user", "content": "hi"}],
        response_format={"type": "text"},
        max_tokens=4,
    )
    assert ok.choices[0].finish_reason in ("stop", "length")


TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 12}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": 0, "maximum": 99},
                    "b": {"type": "integer", "minimum": 0, "maximum": 99},
                },
                "required": ["a", "b"],
            },
        },
    },
]


def _check_call(call: Any, names: set[str]) -> None:
    assert call.type == "function" and call.function.name in names
    args = json.loads(call.function.arguments)
    schema = next(t for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(args, schema["function"]["parameters"])


def test_gateway_required_and_named_tool_calls(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Weather in Paris?"}]
    choices: list[tuple[Any, set[str]]] = [
        ("required", {"get_weather", "add"}),
        ({"type": "function", "function": {"name": "add"}}, {"add"}),
    ]
    called = 0
    for tool_choice, names in choices:
        reply = client.chat.completions.create(
            model="minisgl-demo",
            messages=messages,
            tools=TOOLS,
            tool_choice=tool_choice,
            max_tokens=100,
            temperature=0,
        )
        choice = reply.choices[0]
        if choice.finish_reason == "length":
            continue
        called += 1
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
        _check_call(choice.message.tool_calls[0], names)
        chunks = list(
            client.chat.completions.create(
                model="minisgl-demo",
                messages=messages,
                tools=TOOLS,
                tool_choice=tool_choice,
                max_tokens=100,
                temperature=0,
                stream=True,
            )
        )
        calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
        assert len(calls) == 1 and chunks[-1].choices[0].finish_reason == "tool_calls"
        assert calls[0].function.arguments == choice.message.tool_calls[0].function.arguments
    assert called >= 1
    for tool_choice in ("auto", {"type": "function", "function": {"name": "nope"}}):
        with pytest.raises(openai.BadRequestError, match="tool_choice"):
            client.chat.completions.create(
                model="minisgl-demo",
                messages=messages,
                tools=TOOLS,
                tool_choice=tool_choice,  # type: ignore[arg-type]
                max_tokens=8,
            )
