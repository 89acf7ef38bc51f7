"""An OpenAI-compatible HTTP gateway in front of a `minisgl serve` gRPC server.

    minisgl serve --port 50051 &
    minisgl gateway --target 127.0.0.1:50051 --port 8000
    curl 127.0.0.1:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "hi"}]}'

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream` as server-sent
events), GET /v1/models, GET /health. Each HTTP request becomes one Generate or StreamGenerate
call per choice (`n`, at most MAX_N; the server's radix cache computes the shared prompt once;
with a `seed`, choice i samples with seed + i). A client that disconnects, streaming or not,
cancels its calls, which aborts the requests in the server and frees their KV cache.

Errors: every error response, whatever its origin (a bad field, a gRPC status, an unknown
route, a wrong method, a body over MAX_BODY_BYTES, malformed JSON, a bug), has an OpenAI
body `{"error": {"message", "type", "param", "code"}}` (`code`: the HTTP status). `param` is
the OpenAI name of the offending field (`temperature`, `max_tokens`, `messages`), also for the
server's INVALID_ARGUMENT errors, whose gRPC field paths (`sampling.temperature`) are mapped
back. gRPC statuses map as `_STATUS` says: INVALID_ARGUMENT and OUT_OF_RANGE 400,
UNAUTHENTICATED 401, PERMISSION_DENIED 403, NOT_FOUND 404, ALREADY_EXISTS 409 (an
`x-request-id` already in flight), RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, DEADLINE_EXCEEDED
504, anything else 500. An error after a stream's headers is sent as a last `data: {"error":
...}` event before `data: [DONE]`.

Supported request fields (any other field is a 400 naming it; a field of the wrong type too):
- both routes: model (must name the served model when given), n, stream, stream_options
  (include_usage; include_obfuscation is accepted and has no effect), max_tokens /
  max_completion_tokens, temperature, top_p, seed, stop, presence_penalty, frequency_penalty,
  logprobs, plus vLLM's extensions top_k, min_p, repetition_penalty, min_tokens, ignore_eos,
  stop_token_ids, skip_special_tokens, include_stop_str_in_output;
- completions: prompt (one string, or one list of token ids); `logprobs` = N alternatives;
- chat: messages (role and content: a string, null, or a list of text parts), top_logprobs
  (with `logprobs: true`); each token's text is as decoded on its own.

Accepted and ignored because they do not change the output (`_IGNORED`): user, metadata,
store, prompt_cache_key, safety_identifier, service_tier "auto" / "default".

Not supported, a 400 "not supported" naming the field unless it has the value that asks for
nothing (`_NOT_SUPPORTED`): logit_bias (but {}), response_format (but {"type": "text"}),
tools (but []), tool_choice (but "none"), functions (but []), function_call (but "none"),
parallel_tool_calls, audio, modalities (but ["text"]), prediction, reasoning_effort,
verbosity, web_search_options, service_tier other than "auto" / "default", echo (but false),
suffix (but ""), best_of other than n, stream_options.continuous_usage_stats; in chat
messages, name, tool_calls, tool_call_id, function_call and audio (but null), and content parts
other than text.

The gateway imports neither torch nor the engine; it needs aiohttp (`pip install minisgl[http]`).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from minisgl.v1 import common_pb2, generation_pb2, generation_pb2_grpc, model_pb2, model_pb2_grpc

log = logging.getLogger(__name__)

_INTERNAL = (500, "internal_error")
#: Every gRPC status a call can end with -> (HTTP status, OpenAI error type).
_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    # The server's own faults, and statuses it never sends for a client's mistake.
    grpc.StatusCode.CANCELLED: _INTERNAL,
    grpc.StatusCode.UNKNOWN: _INTERNAL,
    grpc.StatusCode.FAILED_PRECONDITION: _INTERNAL,
    grpc.StatusCode.ABORTED: _INTERNAL,
    grpc.StatusCode.UNIMPLEMENTED: _INTERNAL,
    grpc.StatusCode.INTERNAL: _INTERNAL,
    grpc.StatusCode.DATA_LOSS: _INTERNAL,
}
#: The OpenAI error type of an error the gateway raises itself, by HTTP status.
_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout",
}
_FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length"}
MAX_TOP_LOGPROBS = 20  # the server's limit
MAX_N = 16  # most choices per request
MAX_BODY_BYTES = 64 * 2**20  # the server's default --max-message-mib
_ROUTES = "POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health"

_FLOATS = (  # OpenAI / vLLM names that are also float SamplingOptions fields
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)
_COMMON = frozenset(
    {
        "model",
        "n",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        *_FLOATS,
        "top_k",
        "seed",
        "stop",
        "logprobs",
        "min_tokens",
        "ignore_eos",
        "stop_token_ids",
        "skip_special_tokens",
        "include_stop_str_in_output",
    }
)
_SUPPORTED = {False: _COMMON | {"prompt"}, True: _COMMON | {"messages", "top_logprobs"}}
#: Fields accepted and ignored (they do not change the output), with the type they must have.
_IGNORED: dict[str, type] = {
    "user": str,
    "metadata": dict,
    "store": bool,
    "prompt_cache_key": str,
    "safety_identifier": str,
}


def _never(value: Any) -> bool:
    return False


#: OpenAI fields that are not implemented -> which values ask for nothing (and are accepted).
_NOT_SUPPORTED: dict[str, Callable[[Any], bool]] = {
    "logit_bias": lambda v: v == {},
    "response_format": lambda v: v == {"type": "text"},
    "tools": lambda v: v == [],
    "tool_choice": lambda v: v == "none",
    "functions": lambda v: v == [],
    "function_call": lambda v: v == "none",
    "parallel_tool_calls": _never,
    "audio": _never,
    "modalities": lambda v: v == ["text"],
    "prediction": _never,
    "reasoning_effort": _never,
    "verbosity": _never,
    "web_search_options": _never,
    "service_tier": lambda v: v in ("auto", "default"),
    "echo": lambda v: v is False,
    "suffix": lambda v: v == "",
    "best_of": _never,  # best_of == n is accepted: see _check_fields
}
_COMPLETIONS_ONLY = frozenset({"echo", "suffix", "best_of"})
#: Chat message fields besides role and content: accepted only when null (or []).
_MESSAGE_EXTRAS = frozenset({"name", "tool_calls", "tool_call_id", "function_call", "audio"})
#: A gRPC field path the server names -> the OpenAI field (the ones that depend on the
#: route or the body are in _openai_field).
_FROM_PROTO = {
    **{f"sampling.{k}": k for k in (*_FLOATS, "top_k", "seed")},
    "stopping.min_new_tokens": "min_tokens",
    "stopping.stop": "stop",
    "stopping.stop_token_ids": "stop_token_ids",
    "stopping.ignore_eos": "ignore_eos",
    "stopping.include_stop_str_in_output": "include_stop_str_in_output",
    "output.logprobs": "logprobs",
    "output.skip_special_tokens": "skip_special_tokens",
}
_FIELD_PATH = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*|\[\d+\])*): ")


class ApiError(Exception):
    """An error response: HTTP status, OpenAI error type, message and the OpenAI field."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.param = param
        self.status = status
        self.kind = kind or _TYPES.get(
            status, "internal_error" if status >= 500 else "invalid_request_error"
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": str(self),
                "type": self.kind,
                "param": self.param,
                "code": self.status,
            }
        }


class BadRequest(ApiError):
    """A request the gateway refuses without calling the server (400, or 404 for the model)."""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _openai_field(path: str, body: dict[str, Any], chat: bool) -> tuple[str, str | None]:
    """(the name to show, the OpenAI param) of a gRPC field path named by the server."""
    if path in _FROM_PROTO:
        return _FROM_PROTO[path], _FROM_PROTO[path]
    if path == "stopping.max_new_tokens":
        name = "max_completion_tokens" if body.get("max_completion_tokens") else "max_tokens"
        return name, name
    if path == "output.top_logprobs":
        name = "top_logprobs" if chat else "logprobs"
        return name, name
    if path == "request_id":
        return "x-request-id", None
    if chat and path.startswith("prompt.chat.messages"):
        return "messages" + path.removeprefix("prompt.chat.messages"), "messages"
    if path == "prompt" or path.startswith("prompt."):
        return ("messages", "messages") if chat else ("prompt", "prompt")
    return path, None


def _rpc_error(e: grpc.aio.AioRpcError, body: dict[str, Any] | None, chat: bool) -> ApiError:
    """The error response of a failed gRPC call; the server's field path becomes OpenAI's."""
    status, kind = _STATUS.get(e.code(), _INTERNAL)
    message = e.details() or e.code().name
    param = None
    if body is not None:
        m = _FIELD_PATH.match(message)
        if m is not None:
            name, param = _openai_field(m[1], body, chat)
            message = name + message[len(m[1]) :]
    return ApiError(message, param, status, kind)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body (UTF-8; NaN, Infinity and overflowing numbers refused)."""
    try:
        body = json.loads(raw, parse_float=_finite_float, parse_constant=_no_constant)
    except RecursionError:
        raise BadRequest("the body is not valid JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, our refusals, int limits
        raise BadRequest(f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    for key, value in body.items():  # "\ud800" parses, but no text may hold it
        try:
            json.dumps([key, value], ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise BadRequest(f"{key}: holds a lone UTF-16 surrogate (not text)", key) from None
        except RecursionError:
            raise BadRequest(f"{key}: nested too deeply", key) from None
    return body


def _check_fields(body: dict[str, Any], chat: bool) -> None:
    """Refuse fields that are unknown, not implemented, or ignored but of the wrong type."""
    for key, value in body.items():
        if key in _SUPPORTED[chat] or value is None:
            continue
        if key in _IGNORED:
            want = _IGNORED[key]
            if not isinstance(value, want):
                raise BadRequest(f"{key}: must be a {want.__name__}", key)
        elif key in _NOT_SUPPORTED and not (chat and key in _COMPLETIONS_ONLY):
            if _NOT_SUPPORTED[key](value) or (key == "best_of" and value == (body.get("n") or 1)):
                continue
            raise BadRequest(f"{key}: not supported by this gateway ({_short(value)})", key)
        else:
            route = "chat completions" if chat else "completions"
            raise BadRequest(f"{key}: unrecognized request argument; not supported by {route}", key)


def _number(body: dict[str, Any], key: str) -> float | int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{key}: must be a number", key)
    return value


def _integer(body: dict[str, Any], key: str, what: str = "an integer") -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key}: must be {what}", key)
    return value


def _boolean(body: dict[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise BadRequest(f"{key}: invalid option {_short(value)}: must be a boolean", key)


def _set(message: Any, field: str, key: str, value: Any) -> None:
    """Set a proto field from the OpenAI field `key`; a value protobuf refuses is a 400."""
    try:
        if isinstance(value, list):
            getattr(message, field).extend(value)
        else:
            setattr(message, field, value)
    except (TypeError, ValueError) as e:
        raise BadRequest(f"{key}: invalid option {_short(value)} ({e})", key) from None


def _top_logprobs(body: dict[str, Any], key: str) -> int:
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key}: must be an integer from 0 to {MAX_TOP_LOGPROBS}", key)
    if not 0 <= value <= MAX_TOP_LOGPROBS:
        raise BadRequest(f"{key}: must be an integer from 0 to {MAX_TOP_LOGPROBS}", key)
    return value


def _output_options(body: dict[str, Any], chat: bool) -> common_pb2.OutputOptions:
    """Logprobs (completions: `logprobs` = how many top alternatives; chat: `logprobs` true,
    `top_logprobs` = how many) and skip_special_tokens."""
    out = common_pb2.OutputOptions()
    if chat:
        wanted = body.get("logprobs")
        if wanted not in (None, True, False):
            raise BadRequest("logprobs: must be a boolean", "logprobs")
        if body.get("top_logprobs") is not None:
            if not wanted:
                raise BadRequest("top_logprobs: needs logprobs: true", "top_logprobs")
            out.top_logprobs = _top_logprobs(body, "top_logprobs")
        out.logprobs = bool(wanted)
    elif body.get("logprobs") is not None:
        out.logprobs = True
        out.top_logprobs = _top_logprobs(body, "logprobs")
    skip = _boolean(body, "skip_special_tokens")
    if skip is not None:
        out.skip_special_tokens = skip
    return out


def _stop(body: dict[str, Any]) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest("stop: must be a string or a list of strings", "stop")
    return stop


def _options(
    body: dict[str, Any], default_max_tokens: int | None, chat: bool
) -> tuple[common_pb2.SamplingOptions, common_pb2.StoppingOptions, common_pb2.OutputOptions]:
    """The SamplingOptions, StoppingOptions and OutputOptions of a request body; any field of
    the wrong type or out of the proto's range is a 400 naming it."""
    sampling = common_pb2.SamplingOptions()
    for key in _FLOATS:
        value = _number(body, key)
        if value is not None:
            _set(sampling, key, key, value)
    for key in ("top_k", "seed"):
        value = _integer(body, key)
        if value is not None:
            _set(sampling, key, key, value)
    stopping = common_pb2.StoppingOptions()
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, key, "a positive integer")
    if max_tokens is None:
        max_tokens = default_max_tokens
    if max_tokens is not None:
        if max_tokens < 1:
            raise BadRequest(f"{key}: must be a positive integer", key)
        _set(stopping, "max_new_tokens", key, max_tokens)
    min_tokens = _integer(body, "min_tokens")
    if min_tokens is not None:
        _set(stopping, "min_new_tokens", "min_tokens", min_tokens)
    stop = _stop(body)
    if stop is not None:
        _set(stopping, "stop", "stop", stop)
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or any(isinstance(t, bool) for t in ids):
            raise BadRequest("stop_token_ids: must be a list of token ids", "stop_token_ids")
        _set(stopping, "stop_token_ids", "stop_token_ids", ids)
    for key in ("ignore_eos", "include_stop_str_in_output"):
        flag = _boolean(body, key)
        if flag is not None:
            setattr(stopping, key, flag)
    return sampling, stopping, _output_options(body, chat)


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    """Whether the stream ends with a usage chunk (stream_options.include_usage)."""
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not stream:
        raise BadRequest("stream_options: only allowed with stream: true", "stream_options")
    if not isinstance(opts, dict):
        raise BadRequest("stream_options: must be an object", "stream_options")
    for key, value in opts.items():
        if key not in ("include_usage", "include_obfuscation", "continuous_usage_stats"):
            raise BadRequest(
                f"stream_options.{key}: unrecognized; not supported by this gateway",
                "stream_options",
            )
        if value is not None and not isinstance(value, bool):
            raise BadRequest(f"stream_options.{key}: must be a boolean", "stream_options")
        if key == "continuous_usage_stats" and value:
            raise BadRequest(
                "stream_options.continuous_usage_stats: not supported by this gateway",
                "stream_options",
            )
    return bool(opts.get("include_usage"))


def _token_ids(value: list[Any]) -> common_pb2.Prompt:
    if any(isinstance(t, bool) or not 0 <= t < 2**32 for t in value):
        raise BadRequest("prompt: token ids must be integers in [0, 2**32)", "prompt")
    return common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=value))


def _completion_prompt(body: dict[str, Any]) -> common_pb2.Prompt:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return common_pb2.Prompt(text=prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return _token_ids(prompt)
    raise BadRequest(
        "prompt: one string or one list of token ids (batches of several prompts are not "
        "supported)",
        "prompt",
    )


def _content(i: int, content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise BadRequest(
                    f"messages[{i}].content: only text parts are supported", "messages"
                )
            if not isinstance(part.get("text"), str):
                raise BadRequest(f"messages[{i}].content: a text part needs a text", "messages")
            texts.append(part["text"])
        return "".join(texts)
    raise BadRequest(f"messages[{i}].content: must be a string or a list of parts", "messages")


def _chat_prompt(body: dict[str, Any]) -> common_pb2.Prompt:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: a non-empty list is required", "messages")
    chat = common_pb2.ChatMessages()
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise BadRequest(f"messages[{i}]: needs a role and a content", "messages")
        for key, value in m.items():
            if key in ("role", "content") or (value in (None, []) and key in _MESSAGE_EXTRAS):
                continue
            if key == "refusal" and value is None:
                continue
            raise BadRequest(f"messages[{i}].{key}: not supported by this gateway", "messages")
        chat.messages.add(role=m["role"], content=_content(i, m.get("content")))
    return common_pb2.Prompt(chat=chat)


def _num_choices(body: dict[str, Any]) -> int:
    n = body.get("n")
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise BadRequest(f"n: must be an integer from 1 to {MAX_N}", "n")
    return n


def _completion_logprobs(lps: Any, offset: int) -> dict[str, Any]:
    """The legacy completions `logprobs` object of some tokens, text offsets from `offset`."""
    tokens = [lp.chosen.token for lp in lps]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.chosen.logprob for lp in lps],
        "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def _chat_logprobs(lps: Any) -> dict[str, Any]:
    """The chat `logprobs` object of some tokens."""

    def entry(t: Any) -> dict[str, Any]:
        return {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode())}

    return {
        "content": [{**entry(lp.chosen), "top_logprobs": [entry(t) for t in lp.top]} for lp in lps]
    }


def _choice_fields(fields: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """One request per choice: ids rid-i, and with a seed, seed + i (distinct, reproducible)."""
    if n == 1:
        return [fields]
    out = []
    sampling = fields["sampling"]
    for i in range(n):
        s = common_pb2.SamplingOptions()
        s.CopyFrom(sampling)
        if sampling.HasField("seed"):
            s.seed = sampling.seed + i
        out.append({**fields, "sampling": s, "request_id": f"{fields['request_id']}-{i}"})
    return out


def _usage(usages: list[common_pb2.Usage]) -> dict[str, Any]:
    """OpenAI usage of all choices: the prompt once, the completions summed."""
    prompt = usages[0].prompt_tokens
    completion = sum(u.completion_tokens for u in usages)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": usages[0].cached_tokens},
    }


class Gateway:
    """The gRPC side: one channel to the server, requests built from OpenAI bodies."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.generation = generation_pb2_grpc.GenerationServiceStub(self.channel)
        self.models = model_pb2_grpc.ModelServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self._model: str | None = None
        self.context_length = 0

    async def model_name(self) -> str:
        if self._model is None:
            info = await self.models.GetModelInfo(model_pb2.GetModelInfoRequest(), timeout=10)
            self._model, self.context_length = info.model, info.context_length
        return self._model

    async def check_model(self, body: dict[str, Any]) -> str:
        asked = body.get("model")
        if asked is not None and not isinstance(asked, str):
            raise BadRequest("model: must be a string", "model")
        served = await self.model_name()
        if asked not in (None, "", served):
            raise BadRequest(
                f"model: {asked!r} is not served here (this is {served!r})", "model", 404
            )
        return served

    def request(
        self,
        body: dict[str, Any],
        prompt: common_pb2.Prompt,
        rid: str,
        default_max_tokens: int | None,
        chat: bool,
    ) -> dict[str, Any]:
        """GenerateRequest fields; a field of the wrong type or range is a 400 naming it."""
        sampling, stopping, output = _options(body, default_max_tokens, chat)
        return {
            "prompt": prompt,
            "sampling": sampling,
            "stopping": stopping,
            "output": output,
            "request_id": rid,
        }

    async def generate(self, fields: dict[str, Any]) -> generation_pb2.GenerateResponse:
        return await self.generation.Generate(generation_pb2.GenerateRequest(**fields))

    def stream(self, fields: dict[str, Any]) -> Any:
        """The StreamGenerate call (read() it until grpc.aio.EOF; cancel() it to abort)."""
        return self.generation.StreamGenerate(generation_pb2.StreamGenerateRequest(**fields))

    async def healthy(self) -> bool:
        try:
            resp = await self.health_stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError:
            return False
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


def build_app(target: str, max_body_bytes: int = MAX_BODY_BYTES) -> Any:
    """The aiohttp application serving the OpenAI routes in front of the server at `target`.

    Serve it with handler cancellation on (`run_gateway` does): that is how a client that
    disconnects from a non-streaming request cancels its gRPC calls."""
    from aiohttp import web
    from aiohttp.http_exceptions import HttpProcessingError

    gateway_key = web.AppKey("gateway", Gateway)  # made on start-up, inside the event loop

    def error(e: ApiError, headers: dict[str, str] | None = None) -> web.Response:
        return web.json_response(e.body(), status=e.status, headers=headers)

    def http_error(request: web.Request, e: web.HTTPException) -> web.Response:
        """aiohttp's own errors (no route, wrong method, body too large, ...) as OpenAI's."""
        headers = None
        if isinstance(e, web.HTTPNotFound):
            message = f"no route {request.method} {request.path} (routes: {_ROUTES})"
        elif isinstance(e, web.HTTPMethodNotAllowed):
            allowed = ", ".join(sorted(e.allowed_methods))
            message = f"method {request.method} is not allowed on {request.path} ({allowed})"
            headers = {"Allow": allowed}
        elif isinstance(e, web.HTTPRequestEntityTooLarge):
            message = f"the request body is larger than {max_body_bytes} bytes"
        else:
            message = e.text if e.text and e.content_type == "text/plain" else e.reason
        return error(ApiError(message, None, e.status), headers)

    @web.middleware
    async def openai_errors(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            length = request.content_length
            if length is not None and length > max_body_bytes:
                raise web.HTTPRequestEntityTooLarge(max_body_bytes, length)
            return await handler(request)
        except ApiError as e:
            return error(e)
        except grpc.aio.AioRpcError as e:
            return error(_rpc_error(e, None, False))
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return http_error(request, e)
        except ConnectionError:  # the client left: nobody to answer
            raise
        except Exception:
            log.exception("unexpected error on %s %s", request.method, request.path)
            return error(ApiError("internal error in the gateway (logged)", None, 500))

    async def read_body(request: web.Request) -> dict[str, Any]:
        try:
            raw = await request.read()
        except (HttpProcessingError, web.RequestPayloadError) as e:  # e.g. bad gzip, chunks
            raise BadRequest(f"the body could not be read: {e}") from None
        return parse_body(raw)

    async def completion(request: web.Request, chat: bool) -> web.StreamResponse:
        body = await read_body(request)
        _check_fields(body, chat)
        prompt = _chat_prompt(body) if chat else _completion_prompt(body)
        n = _num_choices(body)
        stream = bool(_boolean(body, "stream"))
        include_usage = _stream_options(body, stream)
        prefix = "chatcmpl" if chat else "cmpl"
        rid = request.headers.get("x-request-id") or f"{prefix}-{secrets.token_hex(12)}"
        if not rid.isascii():
            raise BadRequest("x-request-id: must be ASCII letters, digits, '.', '_', ':' or '-'")
        gw = request.app[gateway_key]
        # OpenAI's completions default to 16 tokens; chat replies run to the server's default.
        fields = gw.request(body, prompt, rid, None if chat else 16, chat)
        model = await gw.check_model(body)
        per_choice = _choice_fields(fields, n)
        created = int(time.time())
        logprobs = bool(fields["output"].logprobs)
        try:
            if not stream:
                outs = await generate_all(gw, per_choice)
            else:
                calls = [gw.stream(f) for f in per_choice]
                try:
                    return await stream_events(
                        request, calls, chat, include_usage, logprobs, body, rid, model, created
                    )
                finally:
                    for call in calls:
                        call.cancel()  # a no-op once finished; an abort if the client left
        except grpc.aio.AioRpcError as e:
            raise _rpc_error(e, body, chat) from None
        choices = []
        for i, out in enumerate(outs):
            choice: dict[str, Any] = {"index": i, "finish_reason": _FINISH.get(out.finish.reason)}
            if chat:
                choice["message"] = {"role": "assistant", "content": out.text}
                choice["logprobs"] = _chat_logprobs(out.logprobs) if logprobs else None
            else:
                lp = _completion_logprobs(out.logprobs, 0) if logprobs else None
                choice.update(text=out.text, logprobs=lp)
            choices.append(choice)
        return web.json_response(
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": _usage([out.usage for out in outs]),
            }
        )

    async def generate_all(
        gw: Gateway, per_choice: list[dict[str, Any]]
    ) -> list[generation_pb2.GenerateResponse]:
        """The Generate calls of all choices. If one fails, or the handler is cancelled (the
        client disconnected), the other calls are cancelled: the server aborts them."""
        tasks = [asyncio.ensure_future(gw.generate(f)) for f in per_choice]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()  # a no-op once done

    async def stream_events(
        request: web.Request,
        calls: list[Any],
        chat: bool,
        include_usage: bool,
        logprobs: bool,
        body: dict[str, Any],
        rid: str,
        model: str,
        created: int,
    ) -> web.StreamResponse:
        """Server-sent events of the choices' streams, interleaved as their messages come."""
        # Errors before any output (each call's first message) still become HTTP errors.
        firsts = await asyncio.gather(*(call.read() for call in calls))
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        kind = "chat.completion.chunk" if chat else "text_completion"

        async def send(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> None:
            chunk: dict[str, Any] = {
                "id": rid,
                "object": kind,
                "created": created,
                "model": model,
                "choices": choices,
            }
            if include_usage:
                chunk["usage"] = usage
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())

        if chat:
            role = {"role": "assistant", "content": ""}
            await send(
                [{"index": i, "delta": role, "finish_reason": None} for i in range(len(calls))]
            )
        # One reader per call feeds a queue: (choice, message), (choice, EOF) or (-1, error).
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def reader(i: int, call: Any, msg: Any) -> None:
            try:
                while msg is not grpc.aio.EOF:  # type: ignore[attr-defined]
                    await queue.put((i, msg))
                    msg = await call.read()
                await queue.put((i, msg))
            except grpc.aio.AioRpcError as e:
                await queue.put((-1, e))

        tasks = [
            asyncio.create_task(reader(i, c, m))
            for i, (c, m) in enumerate(zip(calls, firsts, strict=True))
        ]
        usages: list[common_pb2.Usage] = []
        offsets = [0] * len(calls)  # completions' text_offset, per choice
        try:
            open_calls = len(calls)
            while open_calls:
                i, msg = await queue.get()
                if isinstance(msg, grpc.aio.AioRpcError):
                    raise msg
                if msg is grpc.aio.EOF:  # type: ignore[attr-defined]
                    open_calls -= 1
                    continue
                finish = _FINISH.get(msg.finish.reason) if msg.HasField("finish") else None
                if msg.text or finish or (logprobs and msg.logprobs):
                    lp: dict[str, Any] | None = None
                    if chat:
                        piece: dict[str, Any] = {"delta": {"content": msg.text} if msg.text else {}}
                        if logprobs:
                            lp = _chat_logprobs(msg.logprobs)
                    else:
                        if logprobs:
                            lp = _completion_logprobs(msg.logprobs, offsets[i])
                            offsets[i] += sum(len(t) for t in lp["tokens"])
                        piece = {"text": msg.text}
                    piece["logprobs"] = lp
                    await send([{"index": i, **piece, "finish_reason": finish}])
                if msg.HasField("usage"):
                    usages.append(msg.usage)
            if include_usage and len(usages) == len(calls):
                await send([], _usage(usages))
        except grpc.aio.AioRpcError as e:  # after the headers: report it in the stream
            await resp.write(f"data: {json.dumps(_rpc_error(e, body, chat).body())}\n\n".encode())
        except ConnectionError:
            raise
        except Exception:  # a bug: the headers are sent, so it can only end the stream
            log.exception("unexpected error in the stream of %s", rid)
            err = ApiError("internal error in the gateway (logged)", None, 500)
            await resp.write(f"data: {json.dumps(err.body())}\n\n".encode())
        finally:
            for task in tasks:
                task.cancel()
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def completions(request: web.Request) -> web.StreamResponse:
        return await completion(request, chat=False)

    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await completion(request, chat=True)

    async def models(request: web.Request) -> web.StreamResponse:
        gw = request.app[gateway_key]
        name = await gw.model_name()
        card = {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "minisgl",
            "max_model_len": gw.context_length,
        }
        return web.json_response({"object": "list", "data": [card]})

    async def health(request: web.Request) -> web.StreamResponse:
        ok = await request.app[gateway_key].healthy()
        return web.json_response(
            {"status": "ok" if ok else "unavailable"}, status=200 if ok else 503
        )

    async def start(app: web.Application) -> None:
        app[gateway_key] = Gateway(target)

    async def close(app: web.Application) -> None:
        await app[gateway_key].channel.close(grace=None)

    # The middleware refuses a declared length over the limit before reading; aiohttp refuses
    # a chunked body once it reads past it.
    app = web.Application(client_max_size=max_body_bytes, middlewares=[openai_errors])
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.on_startup.append(start)
    app.on_cleanup.append(close)
    return app


def listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address of `host` (as aiohttp binds them), made here so
    that a bad host or a busy port is one clear ValueError before anything starts."""
    where = f"{host}:{port}"
    if not 1 <= port <= 65535:
        raise ValueError(f"gateway --port: {port} is not a port (1..65535)")
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, UnicodeError) as e:
        raise ValueError(f"gateway --host: cannot resolve {host!r} ({e})") from None
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not SO_REUSEPORT
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
    except OSError as e:
        for sock in socks:
            sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"gateway: cannot listen on {where}: the port is in use") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise ValueError(
                f"gateway --host: cannot listen on {where}: not an address of this machine"
            ) from None
        raise ValueError(f"gateway: cannot listen on {where}: {e.strerror or e}") from None
    return socks


def run_gateway(target: str, host: str, port: int) -> int:
    """Serve until interrupted (SIGINT / SIGTERM). ValueError (one line) if it cannot listen."""
    try:
        from aiohttp import web
    except ImportError:
        log.error("the HTTP gateway needs aiohttp: pip install 'minisgl[http]'")
        return 2
    socks = listen(host, port)
    log.info("OpenAI-compatible gateway on http://%s:%d -> gRPC %s", host, port, target)
    web.run_app(
        build_app(target),
        sock=socks,
        print=None,
        access_log=None,
        handler_cancellation=True,  # a client that disconnects cancels its calls
    )
    return 0
