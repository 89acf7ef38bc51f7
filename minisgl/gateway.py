"""An OpenAI-compatible HTTP gateway in front of a `minisgl serve` gRPC server.

    minisgl serve --port 50051 &
    minisgl gateway --target 127.0.0.1:50051 --port 8000
    curl 127.0.0.1:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "hi"}]}'

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream` as server-sent
events), GET /v1/models, GET /health. Each HTTP request becomes one Generate or StreamGenerate
call per choice (`n`, at most MAX_N; the server's radix cache computes the shared prompt once;
with a `seed`, choice i samples with seed + i); a client that disconnects cancels its calls,
which aborts the requests in the server.
gRPC errors map to OpenAI-style error bodies: INVALID_ARGUMENT 400, NOT_FOUND 404,
RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, DEADLINE_EXCEEDED 504, anything else 500.

Supported request fields: model (must name the served model when given), prompt (one string or
one list of token ids) or messages (string contents, or lists of text parts), max_tokens /
max_completion_tokens, temperature, top_p, seed, stop, presence_penalty, frequency_penalty,
n, stream, stream_options.include_usage, plus vLLM's extensions top_k, min_p,
repetition_penalty, min_tokens, ignore_eos, stop_token_ids, skip_special_tokens,
include_stop_str_in_output; logprobs (completions: `logprobs` = N alternatives; chat:
`logprobs` + `top_logprobs`; each token's text as decoded on its own). Not yet: echo, tools
(a clear 400 each).
The gateway imports neither torch nor the engine; it needs aiohttp (`pip install minisgl[http]`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from minisgl.v1 import common_pb2, generation_pb2, generation_pb2_grpc, model_pb2, model_pb2_grpc

log = logging.getLogger(__name__)

_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
_FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length"}
_UNSUPPORTED = ("echo", "tools", "functions", "best_of", "suffix")
MAX_TOP_LOGPROBS = 20  # the server's limit
_SAMPLING = (  # OpenAI / vLLM names that are also SamplingOptions fields
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
)
MAX_N = 16  # most choices per request


class BadRequest(Exception):
    """A request the gateway refuses without calling the server (400, or 404 for the model)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


def _number(body: dict[str, Any], key: str) -> float | int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{key}: must be a number", key)
    return value


def _top_logprobs(body: dict[str, Any], key: str) -> int:
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key}: must be an integer from 0 to {MAX_TOP_LOGPROBS}", key)
    if not 0 <= value <= MAX_TOP_LOGPROBS:
        raise BadRequest(f"{key}: must be an integer from 0 to {MAX_TOP_LOGPROBS}", key)
    return value


def _logprob_options(body: dict[str, Any], chat: bool) -> dict[str, Any]:
    """OutputOptions for logprobs. Completions: `logprobs` = how many top alternatives;
    chat: `logprobs` true, `top_logprobs` = how many."""
    if chat:
        wanted = body.get("logprobs")
        if wanted not in (None, True, False):
            raise BadRequest("logprobs: must be a boolean", "logprobs")
        if body.get("top_logprobs") is not None:
            if not wanted:
                raise BadRequest("top_logprobs: needs logprobs: true", "top_logprobs")
            return {"logprobs": True, "top_logprobs": _top_logprobs(body, "top_logprobs")}
        return {"logprobs": True} if wanted else {}
    if body.get("logprobs") is None:
        return {}
    return {"logprobs": True, "top_logprobs": _top_logprobs(body, "logprobs")}


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


def _options(body: dict[str, Any], default_max_tokens: int | None, chat: bool) -> dict[str, Any]:
    """SamplingOptions / StoppingOptions / OutputOptions of a request body (as keyword dicts)."""
    for key in _UNSUPPORTED:
        if body.get(key) not in (None, False):
            raise BadRequest(f"{key}: not supported by this gateway yet", key)
    sampling = {}
    for key in _SAMPLING:
        value = _number(body, key)
        if value is not None:
            sampling[key] = value
    stopping: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", default_max_tokens))
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest("max_tokens: must be a positive integer", "max_tokens")
        stopping["max_new_tokens"] = max_tokens
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise BadRequest("stop: must be a string or a list of strings", "stop")
        stopping["stop"] = stop
    for key, field in (
        ("min_tokens", "min_new_tokens"),
        ("ignore_eos", "ignore_eos"),
        ("stop_token_ids", "stop_token_ids"),
        ("include_stop_str_in_output", "include_stop_str_in_output"),
    ):
        if body.get(key) is not None:
            stopping[field] = body[key]
    output = _logprob_options(body, chat)
    if body.get("skip_special_tokens") is not None:
        output["skip_special_tokens"] = body["skip_special_tokens"]
    return {"sampling": sampling, "stopping": stopping, "output": output}


def _completion_prompt(body: dict[str, Any]) -> common_pb2.Prompt:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return common_pb2.Prompt(text=prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        if any(isinstance(t, bool) or t < 0 for t in prompt):
            raise BadRequest("prompt: token ids must be non-negative integers", "prompt")
        return common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=prompt))
    raise BadRequest("prompt: one string or one list of token ids", "prompt")


def _chat_prompt(body: dict[str, Any]) -> common_pb2.Prompt:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: a non-empty list is required", "messages")
    chat = common_pb2.ChatMessages()
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}]: needs a role and a content", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise BadRequest(
                    f"messages[{i}].content: only text parts are supported", "messages"
                )
            content = "".join(str(p.get("text", "")) for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content: must be a string", "messages")
        chat.messages.add(role=m["role"], content=content)
    return common_pb2.Prompt(chat=chat)


def _num_choices(body: dict[str, Any]) -> int:
    n = body.get("n")
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise BadRequest(f"n: must be an integer from 1 to {MAX_N}", "n")
    return n


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
        served = await self.model_name()
        asked = body.get("model")
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
        """GenerateRequest fields; wrong types (a string top_k, a negative seed) are a 400."""
        opts = _options(body, default_max_tokens, chat)
        try:
            return {
                "prompt": prompt,
                "sampling": common_pb2.SamplingOptions(**opts["sampling"]),
                "stopping": common_pb2.StoppingOptions(**opts["stopping"]),
                "output": common_pb2.OutputOptions(**opts["output"]),
                "request_id": rid,
            }
        except (TypeError, ValueError) as e:
            raise BadRequest(f"invalid option: {e}") from e

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


def build_app(target: str) -> Any:
    """The aiohttp application serving the OpenAI routes in front of the server at `target`."""
    from aiohttp import web

    gateway_key = web.AppKey("gateway", Gateway)  # made on start-up, inside the event loop

    def error(status: int, message: str, kind: str, param: str | None = None) -> web.Response:
        body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
        return web.json_response(body, status=status)

    async def read_body(request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

    def openai_errors(handler: Handler) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except BadRequest as e:
                kind = "not_found_error" if e.status == 404 else "invalid_request_error"
                return error(e.status, str(e), kind, e.param)
            except grpc.aio.AioRpcError as e:
                status, kind = _STATUS.get(e.code(), (500, "internal_error"))
                return error(status, e.details() or e.code().name, kind)

        return wrapped

    async def completion(request: web.Request, chat: bool) -> web.StreamResponse:
        body = await read_body(request)
        gw = request.app[gateway_key]
        model = await gw.check_model(body)
        prompt = _chat_prompt(body) if chat else _completion_prompt(body)
        prefix = "chatcmpl" if chat else "cmpl"
        rid = request.headers.get("x-request-id") or f"{prefix}-{secrets.token_hex(12)}"
        # OpenAI's completions default to 16 tokens; chat replies run to the server's default.
        fields = gw.request(body, prompt, rid, None if chat else 16, chat)
        logprobs = fields["output"].logprobs
        per_choice = _choice_fields(fields, _num_choices(body))
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            tasks = [asyncio.ensure_future(gw.generate(f)) for f in per_choice]
            try:
                outs = await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:  # one choice failed: abort the others in the server too
                    task.cancel()
                raise
            choices = []
            for i, out in enumerate(outs):
                choice: dict[str, Any] = {
                    "index": i,
                    "finish_reason": _FINISH.get(out.finish.reason),
                }
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
                    "object": kind,
                    "created": created,
                    "model": model,
                    "choices": choices,
                    "usage": _usage([out.usage for out in outs]),
                }
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        calls = [gw.stream(f) for f in per_choice]
        try:
            return await stream_events(
                request, calls, chat, include_usage, logprobs, rid, model, created
            )
        finally:
            for call in calls:
                call.cancel()  # a no-op once finished; aborts the request if the client left

    async def stream_events(
        request: web.Request,
        calls: list[Any],
        chat: bool,
        include_usage: bool,
        logprobs: bool,
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
            status, kind = _STATUS.get(e.code(), (500, "internal_error"))
            err = {"message": e.details() or e.code().name, "type": kind, "code": status}
            await resp.write(f"data: {json.dumps({'error': err})}\n\n".encode())
        finally:
            for task in tasks:
                task.cancel()
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    @openai_errors
    async def completions(request: web.Request) -> web.StreamResponse:
        return await completion(request, chat=False)

    @openai_errors
    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await completion(request, chat=True)

    @openai_errors
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

    app = web.Application(client_max_size=64 * 2**20)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.on_startup.append(start)
    app.on_cleanup.append(close)
    return app


def run_gateway(target: str, host: str, port: int) -> int:
    """Serve until interrupted (SIGINT / SIGTERM)."""
    try:
        from aiohttp import web
    except ImportError:
        log.error("the HTTP gateway needs aiohttp: pip install 'minisgl[http]'")
        return 2
    log.info("OpenAI-compatible gateway on http://%s:%d -> gRPC %s", host, port, target)
    web.run_app(build_app(target), host=host, port=port, print=None, access_log=None)
    return 0
