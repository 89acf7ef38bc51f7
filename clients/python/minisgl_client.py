"""A small synchronous Python client for a `minisgl serve` server.

    from minisgl_client import Client

    with Client("127.0.0.1:50051") as client:
        print(client.generate("Hello", max_new_tokens=16, temperature=0).text)
        for delta in client.stream("Hello", max_new_tokens=16):
            print(delta.text, end="", flush=True)

Options are keyword arguments named like the proto fields: sampling (temperature, top_p,
top_k, min_p, repetition_penalty, presence_penalty, frequency_penalty, seed), stopping
(max_new_tokens, min_new_tokens, stop, stop_token_ids, ignore_eos,
include_stop_str_in_output), output (logprobs, top_logprobs, skip_special_tokens) and at most
one constraint (json_schema: the schema as JSON text, json_object=True, regex, grammar: EBNF,
choice: a list of strings). Errors are grpc.RpcError (code() and details() say what went wrong).

TLS and API keys (a server started with --tls-cert, --tls-client-ca, --api-key):

    Client("localhost:50051", tls_ca="ca.pem")                    # TLS, our own CA
    Client("localhost:50051", tls=True)                           # TLS, the system CAs
    Client("localhost:50051", tls_ca="ca.pem", client_cert="client.pem", client_key="client.key")
    Client("127.0.0.1:50051", api_key="KEY")   # sends `authorization: Bearer KEY` on each call
"""

from __future__ import annotations

import os
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from minisgl.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
)

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]
"""Text, token ids, or a chat: a list of {"role": ..., "content": ...}."""

SAMPLING_OPTIONS = frozenset(common_pb2.SamplingOptions.DESCRIPTOR.fields_by_name)
STOPPING_OPTIONS = frozenset(common_pb2.StoppingOptions.DESCRIPTOR.fields_by_name)
OUTPUT_OPTIONS = frozenset(common_pb2.OutputOptions.DESCRIPTOR.fields_by_name)
CONSTRAINT_OPTIONS = frozenset(common_pb2.Constraint.DESCRIPTOR.fields_by_name)

_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}


@dataclass
class GenerateResult:
    """The finished result of one prompt."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort"
    matched_stop: str | int | None  # the stop string or token id that ended it
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    logprobs: list[common_pb2.TokenLogprobs]


@dataclass
class StreamDelta:
    """One increment of a streamed result; finish_reason is set on the last one only."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[common_pb2.TokenLogprobs]
    prompt_info: common_pb2.PromptInfo | None  # first delta only
    finish_reason: str | None
    matched_stop: str | int | None
    usage: common_pb2.Usage | None  # last delta only


def build_request(
    prompt: Prompt, request_id: str | None = None, **options: Any
) -> generation_pb2.GenerateRequest:
    """A GenerateRequest from a prompt and keyword options; TypeError for unknown options."""
    return _fill(generation_pb2.GenerateRequest(), prompt, request_id, options)


def build_stream_request(
    prompt: Prompt, request_id: str | None = None, **options: Any
) -> generation_pb2.StreamGenerateRequest:
    """The same as build_request, for StreamGenerate."""
    return _fill(generation_pb2.StreamGenerateRequest(), prompt, request_id, options)


_Req = TypeVar("_Req", generation_pb2.GenerateRequest, generation_pb2.StreamGenerateRequest)


def _fill(req: _Req, prompt: Prompt, request_id: str | None, options: dict[str, Any]) -> _Req:
    req.prompt.CopyFrom(_prompt(prompt))
    req.request_id = request_id or ""
    for name, value in options.items():
        if value is None:
            continue
        if name in SAMPLING_OPTIONS:
            group: Any = req.sampling
        elif name in STOPPING_OPTIONS:
            group = req.stopping
        elif name in OUTPUT_OPTIONS:
            group = req.output
        elif name == "choice":
            req.constraint.choice.choices.extend(value)
            continue
        elif name in CONSTRAINT_OPTIONS:
            group = req.constraint
        else:
            raise TypeError(f"unknown generation option: {name}")
        if isinstance(value, (list, tuple)):
            getattr(group, name).extend(value)
        else:
            setattr(group, name, value)
    return req


def _prompt(prompt: Prompt) -> common_pb2.Prompt:
    if isinstance(prompt, str):
        return common_pb2.Prompt(text=prompt)
    items = list(prompt)
    if items and all(isinstance(m, Mapping) for m in items):
        messages = [
            common_pb2.ChatMessage(role=m["role"], content=m["content"])
            for m in items
            if isinstance(m, Mapping)
        ]
        return common_pb2.Prompt(chat=common_pb2.ChatMessages(messages=messages))
    ids = [t for t in items if isinstance(t, int)]
    if len(ids) != len(items):
        raise TypeError("prompt: text, a list of token ids or a list of chat messages")
    return common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=ids))


def _matched(finish: common_pb2.Finish) -> str | int | None:
    kind = finish.WhichOneof("matched")
    if kind == "stop_string":
        return finish.stop_string
    if kind == "stop_token_id":
        return finish.stop_token_id
    return None


def _read(path: str | os.PathLike[str] | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def make_channel(
    target: str,
    *,
    tls: bool = False,
    tls_ca: str | os.PathLike[str] | None = None,
    client_cert: str | os.PathLike[str] | None = None,
    client_key: str | os.PathLike[str] | None = None,
) -> grpc.Channel:
    """A channel to `target`: plaintext, or TLS when `tls` or any of the PEM files is given
    (the server's certificate verified with `tls_ca`, else the system CAs; `client_cert` and
    `client_key` for a server that requires client certificates)."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key: give both or neither")
    if not (tls or tls_ca is not None or client_cert is not None):
        return grpc.insecure_channel(target)
    creds = grpc.ssl_channel_credentials(_read(tls_ca), _read(client_key), _read(client_cert))
    return grpc.secure_channel(target, creds)


class Client:
    """A connection to one server. `target` is "host:port"; or pass your own `channel`.

    `tls`, `tls_ca`, `client_cert`, `client_key`: see make_channel. `api_key`: sent on every
    call as `authorization: Bearer <api_key>`.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        channel: grpc.Channel | None = None,
        timeout: float | None = None,
        tls: bool = False,
        tls_ca: str | os.PathLike[str] | None = None,
        client_cert: str | os.PathLike[str] | None = None,
        client_key: str | os.PathLike[str] | None = None,
        api_key: str | None = None,
    ) -> None:
        self.channel = (
            channel
            if channel is not None
            else make_channel(
                target, tls=tls, tls_ca=tls_ca, client_cert=client_cert, client_key=client_key
            )
        )
        self.timeout = timeout
        self._metadata = () if api_key is None else (("authorization", f"Bearer {api_key}"),)
        self._gen = generation_pb2_grpc.GenerationServiceStub(self.channel)
        self._model = model_pb2_grpc.ModelServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def generate(
        self,
        prompt: Prompt,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> GenerateResult:
        """Generate for one prompt and return the whole result."""
        req = build_request(prompt, request_id, **options)
        resp = self._gen.Generate(req, timeout=self._timeout(timeout), metadata=self._metadata)
        return GenerateResult(
            request_id=resp.request_id,
            text=resp.text,
            token_ids=list(resp.token_ids),
            finish_reason=_FINISH.get(resp.finish.reason),
            matched_stop=_matched(resp.finish),
            prompt_tokens=resp.usage.prompt_tokens,
            completion_tokens=resp.usage.completion_tokens,
            cached_tokens=resp.usage.cached_tokens,
            logprobs=list(resp.logprobs),
        )

    def stream(
        self,
        prompt: Prompt,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> Generator[StreamDelta, None, None]:
        """Stream the result; stopping the iteration early cancels the request."""
        req = build_stream_request(prompt, request_id, **options)
        call = self._gen.StreamGenerate(
            req, timeout=self._timeout(timeout), metadata=self._metadata
        )
        try:
            for msg in call:
                has_finish = msg.HasField("finish")
                yield StreamDelta(
                    request_id=msg.request_id,
                    text=msg.text,
                    token_ids=list(msg.token_ids),
                    logprobs=list(msg.logprobs),
                    prompt_info=msg.prompt_info if msg.HasField("prompt_info") else None,
                    finish_reason=_FINISH.get(msg.finish.reason) if has_finish else None,
                    matched_stop=_matched(msg.finish) if has_finish else None,
                    usage=msg.usage if msg.HasField("usage") else None,
                )
        finally:
            call.cancel()  # a no-op once the stream has ended

    def _timeout(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout

    def model_info(self) -> model_pb2.GetModelInfoResponse:
        """The served model and the engine's options."""
        return self._model.GetModelInfo(
            model_pb2.GetModelInfoRequest(), timeout=self.timeout, metadata=self._metadata
        )

    def load(self) -> model_pb2.GetLoadResponse:
        """Queue length, running requests and KV cache use."""
        return self._model.GetLoad(
            model_pb2.GetLoadRequest(), timeout=self.timeout, metadata=self._metadata
        )

    def tokenize(self, prompt: Prompt) -> list[int]:
        """Token ids of a text or chat prompt, as Generate would see them."""
        req = model_pb2.TokenizeRequest(prompt=_prompt(prompt))
        resp = self._model.Tokenize(req, timeout=self.timeout, metadata=self._metadata)
        return list(resp.token_ids)

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of token ids."""
        req = model_pb2.DetokenizeRequest(
            token_ids=list(token_ids), skip_special_tokens=skip_special_tokens
        )
        return self._model.Detokenize(req, timeout=self.timeout, metadata=self._metadata).text

    def serving(self, service: str = "") -> bool:
        """Whether the health service reports SERVING (for `service`, or the whole server)."""
        req = health_pb2.HealthCheckRequest(service=service)
        resp = self._health.Check(req, timeout=self.timeout, metadata=self._metadata)
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
