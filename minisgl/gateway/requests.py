"""OpenAI request bodies -> the fields of one GenerateRequest per choice. Every field of the
wrong type or range, unknown or not implemented, is a BadRequest naming it."""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from minisgl.gateway.errors import SAMPLING_FLOATS, BadRequest
from minisgl.v1 import common_pb2

MAX_TOP_LOGPROBS = 20  # the server's limit
MAX_N = 16  # most choices per request
MAX_BODY_BYTES = 64 * 2**20  # the server's default --max-message-mib

_COMMON = frozenset(
    {
        "model",
        "n",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        *SAMPLING_FLOATS,
        "top_k",
        "seed",
        "stop",
        "logprobs",
        "min_tokens",
        "ignore_eos",
        "stop_token_ids",
        "skip_special_tokens",
        "include_stop_str_in_output",
        "response_format",
    }
)
_CHAT_ONLY = frozenset({"messages", "top_logprobs", "tools", "tool_choice"})
_SUPPORTED = {False: _COMMON | {"prompt"}, True: _COMMON | _CHAT_ONLY}
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
    "tools": lambda v: v == [],  # (completions; chat supports tools)
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
    "best_of": _never,  # best_of == n is accepted: see check_fields
}
_COMPLETIONS_ONLY = frozenset({"echo", "suffix", "best_of"})
#: Chat message fields besides role and content: accepted only when null (or []).
_MESSAGE_EXTRAS = frozenset({"name", "tool_calls", "tool_call_id", "function_call", "audio"})


@dataclass(frozen=True)
class Completion:
    """A checked completions or chat completions request, ready for the server."""

    body: dict[str, Any]  # the JSON body (for mapping the server's field paths back)
    chat: bool
    rid: str  # the response id; choice i's request id is rid-i when n > 1
    stream: bool
    include_usage: bool  # stream_options.include_usage
    logprobs: bool
    choices: list[dict[str, Any]]  # the GenerateRequest fields of each choice
    # Chat with tool_choice "required" or a named function: the output is one tool call,
    # {"name": ..., "arguments": {...}}, returned as the message's tool_calls.
    tool_call: bool = False


def parse_completion(body: dict[str, Any], chat: bool, request_id: str | None) -> Completion:
    """Check a request body (and its x-request-id header, if any) and build its calls."""
    check_fields(body, chat)
    prompt = _chat_prompt(body) if chat else _completion_prompt(body)
    n = _num_choices(body)
    stream = bool(_boolean(body, "stream"))
    include_usage = _stream_options(body, stream)
    prefix = "chatcmpl" if chat else "cmpl"
    rid = request_id or f"{prefix}-{secrets.token_hex(12)}"
    if not rid.isascii():
        raise BadRequest("x-request-id: must be ASCII letters, digits, '.', '_', ':' or '-'")
    # OpenAI's completions default to 16 tokens; chat replies run to the server's default.
    sampling, stopping, output = _options(body, None if chat else 16, chat)
    fields = {
        "prompt": prompt,
        "sampling": sampling,
        "stopping": stopping,
        "output": output,
        "request_id": rid,
    }
    constraint = response_format(body.get("response_format"))
    tools = tool_call_schema(body) if chat else None
    if tools is not None:
        if constraint is not None:
            raise BadRequest("response_format: not with a required tool call", "response_format")
        constraint = common_pb2.Constraint(json_schema=json.dumps(tools))
    if constraint is not None:
        fields["constraint"] = constraint
    return Completion(
        body,
        chat,
        rid,
        stream,
        include_usage,
        bool(output.logprobs),
        _choice_fields(fields, n),
        tools is not None,
    )


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


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_fields(body: dict[str, Any], chat: bool) -> None:
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


def _sampling_options(body: dict[str, Any]) -> common_pb2.SamplingOptions:
    sampling = common_pb2.SamplingOptions()
    for key in SAMPLING_FLOATS:
        value = _number(body, key)
        if value is not None:
            _set(sampling, key, key, value)
    for key in ("top_k", "seed"):
        value = _integer(body, key)
        if value is not None:
            _set(sampling, key, key, value)
    return sampling


def _stopping_options(
    body: dict[str, Any], default_max_tokens: int | None
) -> common_pb2.StoppingOptions:
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
    return stopping


def _options(
    body: dict[str, Any], default_max_tokens: int | None, chat: bool
) -> tuple[common_pb2.SamplingOptions, common_pb2.StoppingOptions, common_pb2.OutputOptions]:
    """The SamplingOptions, StoppingOptions and OutputOptions of a request body; any field of
    the wrong type or out of the proto's range is a 400 naming it."""
    sampling = _sampling_options(body)
    stopping = _stopping_options(body, default_max_tokens)
    return sampling, stopping, _output_options(body, chat)


def response_format(value: Any) -> common_pb2.Constraint | None:
    """The Constraint of OpenAI's response_format: {"type": "text"} (none), {"type":
    "json_object"} (any JSON object) or {"type": "json_schema", "json_schema": {"name": ...,
    "schema": {...}}} (the schema; without one, any JSON object). Whether the schema compiles
    is the server's to say."""
    key = "response_format"
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise BadRequest(f"{key}: must be an object with a type", key)
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return common_pb2.Constraint(json_object=True)
    if kind != "json_schema":
        raise BadRequest(
            f"{key}.type: must be 'text', 'json_object' or 'json_schema' (got {_short(kind)})", key
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise BadRequest(f"{key}.json_schema: must be an object", key)
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise BadRequest(f"{key}.json_schema.name: a non-empty string is required", key)
    schema = spec.get("schema")
    if schema is None:
        return common_pb2.Constraint(json_object=True)
    if not isinstance(schema, dict):
        raise BadRequest(f"{key}.json_schema.schema: must be an object", key)
    return common_pb2.Constraint(json_schema=json.dumps(schema))


def _tool_functions(body: dict[str, Any]) -> dict[str, Any]:
    """name -> parameters schema of each function in `tools`."""
    tools = body.get("tools")
    if not isinstance(tools, list):
        raise BadRequest("tools: must be a list of tools", "tools")
    functions: dict[str, Any] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise BadRequest(
                f"tools[{i}]: must be {{'type': 'function', 'function': ...}}", "tools"
            )
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest(f"tools[{i}].function.name: a non-empty string is required", "tools")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise BadRequest(f"tools[{i}].function.parameters: must be an object", "tools")
        functions[name] = params
    return functions


def tool_call_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema of the one tool call that `tool_choice` asks for ("required": any of
    `tools`; {"type": "function", "function": {"name": ...}}: that one), or None when no call
    is required ("none", or no tools). "auto" is refused: it needs the model's own tool-call
    format, which this gateway does not parse."""
    choice = body.get("tool_choice")
    if choice == "auto":
        raise BadRequest(
            "tool_choice: 'auto' is not supported by this gateway (use 'required' or a named "
            "function)",
            "tool_choice",
        )
    if body.get("tools") and choice is None:  # OpenAI's default is then "auto"
        raise BadRequest(
            "tools: not supported with tool_choice 'auto' (the default); set tool_choice to "
            "'required' or a named function",
            "tools",
        )
    if not body.get("tools"):
        if choice not in (None, "none"):
            raise BadRequest("tool_choice: needs tools", "tool_choice")
        return None
    functions = _tool_functions(body)
    if choice == "none":
        return None
    if choice == "required":
        names = list(functions)
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in functions:
            raise BadRequest(
                f"tool_choice: no function named {_short(name)} in tools", "tool_choice"
            )
        names = [name]
    else:
        raise BadRequest(
            "tool_choice: must be 'none', 'required' or {'type': 'function', 'function': "
            "{'name': ...}}",
            "tool_choice",
        )
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": n}, "arguments": functions[n]},
            "required": ["name", "arguments"],
        }
        for n in names
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


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


def _choice_fields(fields: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """One request per choice: ids rid-i, and with a seed, seed + i modulo 2**63 (distinct,
    reproducible)."""
    if n == 1:
        return [fields]
    out = []
    sampling = fields["sampling"]
    for i in range(n):
        s = common_pb2.SamplingOptions()
        s.CopyFrom(sampling)
        if sampling.HasField("seed") and sampling.seed < 2**63:  # the server's range
            s.seed = (sampling.seed + i) % 2**63  # (a seed past it is the server's 400)
        out.append({**fields, "sampling": s, "request_id": f"{fields['request_id']}-{i}"})
    return out
