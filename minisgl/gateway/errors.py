"""OpenAI error bodies, the gRPC -> HTTP status table, and the server's field paths mapped
back to OpenAI request fields."""

from __future__ import annotations

import re
from typing import Any

import grpc

_INTERNAL = (500, "internal_error")
#: Every gRPC status a call can end with -> (HTTP status, OpenAI error type).
_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    # From the server: it refused the gateway's own key (the message names --target-api-key).
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

#: OpenAI / vLLM names that are also float SamplingOptions fields.
SAMPLING_FLOATS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)
#: A gRPC field path the server names -> the OpenAI field (the ones that depend on the
#: route or the body are in _openai_field).
_FROM_PROTO = {
    **{f"sampling.{k}": k for k in (*SAMPLING_FLOATS, "top_k", "seed")},
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


def internal_error() -> ApiError:
    """The 500 of a bug in the gateway (the traceback goes to the log, not to the client)."""
    return ApiError("internal error in the gateway (logged)", None, 500)


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
    if path.startswith("constraint."):  # from response_format, or from a forced tool's schema
        name = (
            "tools" if body.get("tools") and not body.get("response_format") else "response_format"
        )
        return name, name
    if chat and path.startswith("prompt.chat.messages"):
        return "messages" + path.removeprefix("prompt.chat.messages"), "messages"
    if path == "prompt" or path.startswith("prompt."):
        return ("messages", "messages") if chat else ("prompt", "prompt")
    return path, None


def rpc_error(e: grpc.aio.AioRpcError, body: dict[str, Any] | None, chat: bool) -> ApiError:
    """The error response of a failed gRPC call; with the request `body`, the server's field
    path in the message becomes the OpenAI field."""
    status, kind = _STATUS.get(e.code(), _INTERNAL)
    message = e.details() or e.code().name
    if e.code() == grpc.StatusCode.UNAUTHENTICATED:
        message = f"the server refused the gateway's API key (--target-api-key): {message}"
    param = None
    if body is not None:
        m = _FIELD_PATH.match(message)
        if m is not None:
            name, param = _openai_field(m[1], body, chat)
            message = name + message[len(m[1]) :]
    return ApiError(message, param, status, kind)
