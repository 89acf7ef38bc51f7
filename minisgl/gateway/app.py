"""The aiohttp application: routes, their handlers, and the middleware that turns every
error into an OpenAI error body. The handlers' state is in the app's typed keys."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Middleware

from minisgl.gateway.errors import ApiError, BadRequest, internal_error, rpc_error
from minisgl.gateway.metrics import GatewayMetrics
from minisgl.gateway.requests import MAX_BODY_BYTES, parse_body, parse_completion
from minisgl.gateway.responses import completion_response
from minisgl.gateway.stream import stream_response
from minisgl.gateway.upstream import Credentials, Upstream
from minisgl.server.security import AUTH_HEADER, KeyCheck
from minisgl.v1 import generation_pb2

log = logging.getLogger(__name__)

TARGET = web.AppKey("target", str)  # the gRPC server's address
CREDENTIALS = web.AppKey("credentials", Credentials)  # how the gateway calls the server
KEYS = web.AppKey("api_keys", KeyCheck)  # the keys clients must send (none: no check)
OPEN_PATHS = frozenset({"/health"})
"""Routes that need no API key (probes carry none); every other path, unknown ones too, does."""
MAX_BODY = web.AppKey("max_body_bytes", int)
UPSTREAM = web.AppKey("upstream", Upstream)  # made on start-up, inside the event loop
_ROUTES = "POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health"


def _error(e: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(e.body(), status=e.status, headers=headers)


def _http_error(request: web.Request, e: web.HTTPException) -> web.Response:
    """aiohttp's own errors (no route, wrong method, body too large, ...) as OpenAI's."""
    headers = None
    if isinstance(e, web.HTTPNotFound):
        message = f"no route {request.method} {request.path} (routes: {_ROUTES})"
    elif isinstance(e, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(e.allowed_methods))
        message = f"method {request.method} is not allowed on {request.path} ({allowed})"
        headers = {"Allow": allowed}
    elif isinstance(e, web.HTTPRequestEntityTooLarge):
        message = f"the request body is larger than {request.app[MAX_BODY]} bytes"
    else:
        message = e.text if e.text and e.content_type == "text/plain" else e.reason
    return _error(ApiError(message, None, e.status), headers)


@web.middleware
async def openai_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error of a handler (or of aiohttp's routing) as an OpenAI error response."""
    try:
        length = request.content_length
        limit = request.app[MAX_BODY]
        if length is not None and length > limit:
            raise web.HTTPRequestEntityTooLarge(limit, length)
        return await handler(request)
    except ApiError as e:
        return _error(e)
    except grpc.aio.AioRpcError as e:
        return _error(rpc_error(e, None, False))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _http_error(request, e)
    except ConnectionError:  # the client left: nobody to answer
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return _error(internal_error())


@web.middleware
async def require_key(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """With API keys configured, a request without `Authorization: Bearer <key>` for one of
    them is a 401 (an OpenAI error body; a warning logged without the key)."""
    keys = request.app[KEYS]
    if keys and request.path not in OPEN_PATHS:
        problem = keys.problem(request.headers.get(AUTH_HEADER))
        if problem is not None:
            log.warning(
                "refused %s %s from %s: %s", request.method, request.path, request.remote, problem
            )
            raise ApiError(problem, None, 401)
    return await handler(request)


async def _read_body(request: web.Request) -> dict[str, Any]:
    try:
        raw = await request.read()
    except (HttpProcessingError, web.RequestPayloadError) as e:  # e.g. bad gzip, chunks
        raise BadRequest(f"the body could not be read: {e}") from None
    return parse_body(raw)


async def _generate_all(
    upstream: Upstream, choices: list[dict[str, Any]]
) -> list[generation_pb2.GenerateResponse]:
    """The Generate calls of all choices. If one fails, or the handler is cancelled (the
    client disconnected), the other calls are cancelled: the server aborts them."""
    tasks = [asyncio.ensure_future(upstream.generate(f)) for f in choices]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()  # a no-op once done


async def _complete(request: web.Request, chat: bool) -> web.StreamResponse:
    """A completions or chat completions request: one call per choice, unary or streamed."""
    body = await _read_body(request)
    c = parse_completion(body, chat, request.headers.get("x-request-id"))
    upstream = request.app[UPSTREAM]
    model = await upstream.check_model(body)
    created = int(time.time())
    try:
        if not c.stream:
            outs = await _generate_all(upstream, c.choices)
        else:
            calls = [upstream.stream(f) for f in c.choices]
            try:
                return await stream_response(request, calls, c, model, created)
            finally:
                for call in calls:
                    call.cancel()  # a no-op once finished; an abort if the client left
    except grpc.aio.AioRpcError as e:
        raise rpc_error(e, body, chat) from None
    return web.json_response(completion_response(c, outs, model, created))


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=True)


async def models(request: web.Request) -> web.StreamResponse:
    upstream = request.app[UPSTREAM]
    name = await upstream.model_name()
    card = {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": "minisgl",
        "max_model_len": upstream.context_length,
    }
    return web.json_response({"object": "list", "data": [card]})


async def health(request: web.Request) -> web.StreamResponse:
    ok = await request.app[UPSTREAM].healthy()
    return web.json_response({"status": "ok" if ok else "unavailable"}, status=200 if ok else 503)


async def _start(app: web.Application) -> None:
    app[UPSTREAM] = Upstream(app[TARGET], app[CREDENTIALS])


async def _close(app: web.Application) -> None:
    await app[UPSTREAM].close()


def build_app(
    target: str,
    max_body_bytes: int = MAX_BODY_BYTES,
    credentials: Credentials | None = None,
    api_keys: Sequence[str] = (),
    metrics: GatewayMetrics | None = None,
) -> web.Application:
    """The aiohttp application serving the OpenAI routes in front of the server at `target`,
    called with `credentials`; with `api_keys`, clients must send one of them; with `metrics`,
    every request is counted there.

    Serve it with handler cancellation on (`run_gateway` does): that is how a client that
    disconnects from a non-streaming request cancels its gRPC calls."""
    # The middleware refuses a declared length over the limit before reading; aiohttp refuses
    # a chunked body once it reads past it.
    middlewares: list[Middleware] = [openai_errors, require_key]
    if metrics is not None:  # outermost: it counts what the others answer
        middlewares.insert(0, metrics.middleware())
    app = web.Application(client_max_size=max_body_bytes, middlewares=middlewares)
    app[TARGET] = target
    app[CREDENTIALS] = credentials or Credentials()
    app[KEYS] = KeyCheck(api_keys)
    app[MAX_BODY] = max_body_bytes
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.on_startup.append(_start)
    app.on_cleanup.append(_close)
    return app
