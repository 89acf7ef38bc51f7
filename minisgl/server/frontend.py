"""The gRPC frontend: asyncio servicers that validate, route to the workers and stream back.

It never imports torch. Requests go to the tokenizer worker; deltas come back from the
detokenizer; model info, load and errors come from the scheduler. Client cancellation and
deadlines turn into an abort that frees the request's KV pages in the scheduler.

Each call gets an internal id of its own (a counter, never reused) under which the workers
know it; the client's request_id is only a label, echoed back, unique among calls in flight.
If a worker dies, every pending call (generation, Tokenize, Detokenize) fails at once with
INTERNAL, and new ones get UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Literal, TypeAlias

import grpc
import zmq.asyncio
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from minisgl.ipc.messages import (
    AbortReq,
    CacheReleased,
    Delta,
    DeltaBatch,
    ErrorCode,
    KvEvents,
    Load,
    Message,
    ModelInfo,
    ReleaseCache,
    ReqError,
    TokenizeCall,
    TokenizeResult,
    WorkerReady,
)
from minisgl.ipc.transport import AsyncReceiver, AsyncSender, Endpoints
from minisgl.server import convert
from minisgl.server.config import ServerConfig
from minisgl.server.metrics import CountRpcs, RequestTimer, RpcMetrics
from minisgl.server.security import AUTH_HEADER, KeyCheck
from minisgl.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
)

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name,
    model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
)
_CODES: dict[ErrorCode, grpc.StatusCode] = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "internal": grpc.StatusCode.INTERNAL,
}
FrontendState = Literal["starting", "serving", "draining", "failed"]
"""starting: until the workers are ready; serving; draining: after SIGTERM, in-flight calls
may finish; failed: a worker died. Only "serving" takes calls."""
_UNAVAILABLE: dict[FrontendState, str] = {
    "starting": "the server is warming up",
    "draining": "the server is shutting down",
    "failed": "the engine has failed",
}
"""Why a call gets UNAVAILABLE in each state but "serving"."""
TOKENIZE_TIMEOUT_S = 30.0
"""A Tokenize / Detokenize call the (live) tokenizer has not answered by then: UNAVAILABLE."""
LABEL_RELEASE_S = 1.0
"""How long a new call waits for the server to see the cancellation of an in-flight call with
the same request_id (the client may have cancelled it just before)."""
#: Workers that announce themselves with WorkerReady (the scheduler sends ModelInfo instead).
READY_WORKERS = frozenset({"tokenizer", "detokenizer"})
RELEASE_TIMEOUT_S = 30.0
"""A ReleaseCache the scheduler has not answered by then: None (server/sglang_service.py)."""
ExtraService: TypeAlias = "tuple[str, Callable[[grpc.aio.Server], None]]"
"""A service served beside minisgl.v1: its full name and the function that registers it."""


class Frontend:
    """Shared state of the servicers: the workers' sockets, in-flight requests, health."""

    def __init__(
        self, cfg: ServerConfig, endpoints: Endpoints, metrics: RpcMetrics | None = None
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        """With --metrics-port: the RPC metrics (server/metrics.py)."""
        self.zmq = zmq.asyncio.Context()
        self.inbox = AsyncReceiver(self.zmq, endpoints.frontend)
        self.to_tokenizer = AsyncSender(self.zmq, endpoints.tokenizer)
        self.to_scheduler = AsyncSender(self.zmq, endpoints.scheduler)
        """Control messages that need no tokenizer (ReleaseCache)."""
        self.service_names: tuple[str, ...] = SERVICE_NAMES
        """The services whose health this frontend sets (build_server adds extra ones)."""
        self.last_receive = 0.0
        """time.time() of the last message from a worker."""
        self.releases: dict[int, asyncio.Future[CacheReleased]] = {}
        self.on_kv_events: Callable[[KvEvents], None] | None = None
        """Where the radix cache's events go (sglang's SubscribeKvEvents); None: dropped."""
        self.health = HealthServicer()
        self.state: FrontendState = "starting"
        self.info: ModelInfo | None = None
        self.load = Load(0, 0, 0.0, 0.0, 0.0, 0)
        self.requests: dict[str, asyncio.Queue[Delta | ReqError]] = {}
        """In-flight generation calls by internal id."""
        self.labels: dict[str, tuple[str, asyncio.Future[bool]]] = {}
        """Client request_id -> the in-flight call with it: (internal id, a future set when
        the call ends, True if it was abandoned: cancelled, deadline passed, stream dropped)."""
        self.awaiting_first: set[str] = set()
        self.calls: dict[int, asyncio.Future[TokenizeResult]] = {}
        self._call_ids = itertools.count()
        self._rids = itertools.count(1)
        self.workers_ready: set[str] = set()
        self.ready = asyncio.Event()
        """Set once the scheduler is warm and the tokenizer and detokenizer are loaded."""

    async def set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def receive_loop(self) -> None:
        """Dispatch everything the workers send to the frontend."""
        while True:
            msg = await self.inbox.recv()
            self.last_receive = time.time()
            try:
                self._dispatch(msg)
            except Exception:  # one bad message must not stop the dispatch of all others
                log.exception("cannot dispatch %s", type(msg).__name__)

    def _dispatch(self, msg: Message) -> None:
        if isinstance(msg, DeltaBatch):
            for delta in msg.deltas:
                queue = self.requests.get(delta.rid)
                if queue is not None:
                    queue.put_nowait(delta)
        elif isinstance(msg, ReqError):
            queue = self.requests.get(msg.rid)
            if queue is not None:
                queue.put_nowait(msg)
        elif isinstance(msg, Load):
            self.load = msg
        elif isinstance(msg, TokenizeResult):
            fut = self.calls.pop(msg.call_id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, KvEvents):
            if self.on_kv_events is not None:
                self.on_kv_events(msg)
        elif isinstance(msg, CacheReleased):
            released = self.releases.pop(msg.call_id, None)
            if released is not None and not released.done():
                released.set_result(msg)
        elif isinstance(msg, ModelInfo | WorkerReady):
            if isinstance(msg, ModelInfo):
                self.info = msg
            else:
                self.workers_ready.add(msg.name)
            if self.info is not None and self.workers_ready >= READY_WORKERS:
                self.ready.set()

    def ready_workers(self) -> set[str]:
        """The workers that have finished loading (the scheduler once it sent ModelInfo)."""
        return self.workers_ready | ({"scheduler"} if self.info is not None else set())

    async def mark_serving(self) -> None:
        self.state = "serving"
        await self.set_health(True)
        log.info(
            "serving %s on %s:%d",
            self.info.model if self.info else "?",
            self.cfg.host,
            self.cfg.port,
        )

    async def fail(self, why: str) -> None:
        """The engine is gone: fail every in-flight request and stop serving."""
        if self.state == "failed":
            return
        log.error("engine failure: %s", why)
        self.state = "failed"
        for rid, queue in self.requests.items():
            queue.put_nowait(ReqError(rid, "internal", f"engine failure: {why}"))
        for call_id, fut in self.calls.items():
            if not fut.done():
                fut.set_result(
                    TokenizeResult(call_id, error=f"engine failure: {why}", code="internal")
                )
        await self.set_health(False)

    async def drain(self) -> None:
        self.state = "draining"
        await self.set_health(False)

    async def check_available(self, context: grpc.aio.ServicerContext[Any, Any]) -> ModelInfo:
        if self.state == "serving" and self.info is not None:
            return self.info
        await context.abort(grpc.StatusCode.UNAVAILABLE, _UNAVAILABLE[self.state])
        raise AssertionError("unreachable")

    async def generate(
        self,
        request: convert.AnyGenerateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        send_metadata: bool = True,
        field_names: Callable[[str], str] | None = None,
    ) -> AsyncIterator[Delta]:
        """Validate, submit and yield deltas until the request finishes; abort if abandoned.

        send_metadata False: the caller sends the call's initial metadata itself (a call that
        runs several generations, sglang's n > 1, can send it only once). field_names: how
        the caller's protocol names the fields in INVALID_ARGUMENT messages (sglang's)."""
        rename = field_names or _same
        timer = RequestTimer()
        info = await self.check_available(context)
        label = request.request_id or uuid.uuid4().hex
        rid = str(next(self._rids))
        try:
            convert.check_request_id(label)
            msg = convert.to_generate_req(request, rid, info, self.cfg.limits)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, rename(str(e)))
        if label in self.labels:
            await self._wait_label(label, context)
            info = await self.check_available(context)  # it may have changed meanwhile
        if len(self.awaiting_first) >= self.cfg.max_queued_requests:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"queue full: {len(self.awaiting_first)} requests waiting",
            )
        # Take the queue place before anything awaits: concurrent calls must each see the
        # places the others took (else several pass the check above at once).
        queue: asyncio.Queue[Delta | ReqError] = asyncio.Queue()
        self.requests[rid] = queue
        ended: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.labels[label] = (rid, ended)
        self.awaiting_first.add(rid)
        finished = sent = False
        status = "CANCELLED"  # until it finishes or fails
        first: Delta | None = None
        last: Delta | None = None
        generated = 0
        try:
            if send_metadata:
                await context.send_initial_metadata((("x-request-id", label),))
            log.debug("request %s is call %s", label, rid)
            self.to_tokenizer.send(msg)
            sent = True
            while True:
                item = await queue.get()
                self.awaiting_first.discard(rid)
                if isinstance(item, ReqError):
                    finished = True
                    status = _CODES[item.code].name
                    message = item.message
                    if item.code == "invalid_argument":
                        message = rename(message)
                    await context.abort(_CODES[item.code], message)
                assert isinstance(item, Delta)
                timer.tokens(len(item.token_ids))
                generated += len(item.token_ids)
                first, last = first or item, item
                finished = item.finish_reason is not None
                if finished:
                    status = "OK"
                item.rid = label  # the client knows its call by its label
                yield item
                if finished:
                    return
        finally:
            del self.requests[rid]
            if label in self.labels and self.labels[label][0] == rid:
                del self.labels[label]
            ended.set_result(not finished)
            self.awaiting_first.discard(rid)
            if sent and not finished:  # cancelled, deadline passed, or the stream was dropped
                log.info("aborting %s (call %s)", label, rid)
                self.to_tokenizer.send(AbortReq(rid))
            if sent:
                reason = last.finish_reason if last is not None else None
                if self.metrics is not None:
                    timer.observe(self.metrics, reason or ("abort" if status != "OK" else None))
                _log_request(label, rid, first, generated, timer, reason, status)

    def abort_label(self, label: str) -> bool:
        """Abort the in-flight call whose request_id is `label`, as if its client had gone:
        the scheduler frees it and its stream ends with finish_reason "abort". False if no
        call has that label."""
        held = self.labels.get(label)
        if held is None:
            return False
        log.info("aborting %s (call %s) on request", label, held[0])
        self.to_tokenizer.send(AbortReq(held[0]))  # behind the request itself, never before
        return True

    async def release_cache(self) -> CacheReleased | None:
        """Have the scheduler evict every prefix-cache entry no running request holds; None
        if it did not answer within RELEASE_TIMEOUT_S."""
        call_id = next(self._call_ids)
        fut: asyncio.Future[CacheReleased] = asyncio.get_running_loop().create_future()
        self.releases[call_id] = fut
        self.to_scheduler.send(ReleaseCache(call_id))
        try:
            return await asyncio.wait_for(fut, RELEASE_TIMEOUT_S)
        except asyncio.TimeoutError:
            return None
        finally:
            self.releases.pop(call_id, None)

    async def _wait_label(self, label: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """ALREADY_EXISTS unless the call that has `label` is abandoned within LABEL_RELEASE_S.

        A client may cancel a call and at once reuse its id: the server may just not have
        processed the cancellation yet (it reaches the frontend apart from the new call). A
        call that goes on, or finishes, was really in flight: the new one is a duplicate.
        """
        held = self.labels.get(label)
        abandoned = False
        if held is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                abandoned = await asyncio.wait_for(asyncio.shield(held[1]), LABEL_RELEASE_S)
        if not abandoned or label in self.labels:  # still there, or another call took it
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {label} is in flight")

    async def tokenize(
        self, call: TokenizeCall, context: grpc.aio.ServicerContext[Any, Any]
    ) -> TokenizeResult:
        """The tokenizer's answer; aborts the call with the mapped status if it failed."""
        call.call_id = next(self._call_ids)
        fut: asyncio.Future[TokenizeResult] = asyncio.get_running_loop().create_future()
        self.calls[call.call_id] = fut
        self.to_tokenizer.send(call)
        try:
            result = await asyncio.wait_for(fut, TOKENIZE_TIMEOUT_S)
        except asyncio.TimeoutError:
            result = None
        finally:
            self.calls.pop(call.call_id, None)
        if result is None:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the tokenizer did not answer within {TOKENIZE_TIMEOUT_S:.0f} s",
            )
            raise AssertionError("unreachable")
        if result.error is not None:
            await context.abort(_CODES[result.code], result.error)
        return result


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    """Generate (unary) and StreamGenerate (server streaming)."""

    def __init__(self, fe: Frontend) -> None:
        self.fe = fe

    async def Generate(
        self,
        request: generation_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> generation_pb2.GenerateResponse:
        resp = generation_pb2.GenerateResponse()
        texts: list[str] = []
        async for delta in self.fe.generate(request, context):
            if not resp.request_id:
                resp.request_id = delta.rid
                resp.prompt_info.prompt_tokens = delta.prompt_tokens
                resp.prompt_info.cached_tokens = delta.cached_tokens
            resp.token_ids.extend(delta.token_ids)
            texts.append(delta.text)
            resp.logprobs.extend(convert.logprobs_pb(delta))
            if delta.finish_reason is not None:
                resp.finish.CopyFrom(convert.finish_pb(delta))
        resp.text = "".join(texts)
        resp.usage.CopyFrom(_usage(resp.prompt_info, len(resp.token_ids)))
        return resp

    async def StreamGenerate(
        self,
        request: generation_pb2.StreamGenerateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[generation_pb2.StreamGenerateResponse]:
        first = True
        generated = 0
        async for delta in self.fe.generate(request, context):
            msg = generation_pb2.StreamGenerateResponse(
                request_id=delta.rid,
                token_ids=delta.token_ids,
                text=delta.text,
                logprobs=convert.logprobs_pb(delta),
            )
            generated += len(delta.token_ids)
            if first:
                msg.prompt_info.prompt_tokens = delta.prompt_tokens
                msg.prompt_info.cached_tokens = delta.cached_tokens
                first = False
            if delta.finish_reason is not None:
                msg.finish.CopyFrom(convert.finish_pb(delta))
                info = common_pb2.PromptInfo(
                    prompt_tokens=delta.prompt_tokens, cached_tokens=delta.cached_tokens
                )
                msg.usage.CopyFrom(_usage(info, generated))
            yield msg


def _same(message: str) -> str:
    return message


def _log_request(
    label: str,
    rid: str,
    first: Delta | None,
    generated: int,
    timer: RequestTimer,
    reason: str | None,
    status: str,
) -> None:
    """The one info line of a finished generation call (never its prompt or its text)."""
    fields = {
        "request_id": label,
        "call": rid,
        "prompt_tokens": first.prompt_tokens if first is not None else 0,
        "cached_tokens": first.cached_tokens if first is not None else 0,
        "generated_tokens": generated,
        "ttft_s": None if timer.ttft is None else round(timer.ttft, 6),
        "duration_s": round(time.monotonic() - timer.start, 6),
        "finish_reason": reason,
        "status": status,
    }
    log.info(
        "request %s (call %s): prompt %d, cached %d, generated %d tokens, ttft %s, "
        "duration %.3f s, finish %s, status %s",
        label,
        rid,
        fields["prompt_tokens"],
        fields["cached_tokens"],
        generated,
        "-" if timer.ttft is None else f"{timer.ttft:.3f} s",
        fields["duration_s"],
        reason,
        status,
        extra={"fields": fields},
    )


def _usage(info: common_pb2.PromptInfo, generated: int) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=info.prompt_tokens,
        completion_tokens=generated,
        cached_tokens=info.cached_tokens,
    )


class ModelServicer(model_pb2_grpc.ModelServiceServicer):
    """Model info, load, and the tokenizer as a service."""

    def __init__(self, fe: Frontend) -> None:
        self.fe = fe

    async def GetModelInfo(
        self, request: model_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> model_pb2.GetModelInfoResponse:
        info = await self.fe.check_available(context)
        return model_pb2.GetModelInfoResponse(
            model=info.model,
            architecture=info.architecture,
            context_length=info.context_length,
            vocab_size=info.vocab_size,
            eos_token_ids=info.eos_token_ids,
            has_tokenizer=info.has_tokenizer,
            dtype=info.dtype,
            device=info.device,
            attention_backend=info.attention_backend,
            page_size=info.page_size,
            kv_cache_tokens=info.kv_cache_tokens,
            radix_cache=info.radix_cache,
            chunked_prefill_size=info.chunked_prefill_size,
            max_running_requests=info.max_running_requests,
            max_queued_requests=self.fe.cfg.max_queued_requests,
        )

    async def GetLoad(
        self, request: model_pb2.GetLoadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> model_pb2.GetLoadResponse:
        load = self.fe.load
        return model_pb2.GetLoadResponse(
            waiting_requests=load.waiting,
            running_requests=load.running,
            inflight_requests=len(self.fe.requests),
            kv_cache_usage=load.kv_usage,
            kv_cache_busy=load.kv_busy,
            cache_hit_rate=load.cache_hit_rate,
            retractions=load.retractions,
        )

    async def Tokenize(
        self, request: model_pb2.TokenizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> model_pb2.TokenizeResponse:
        info = await self.fe.check_available(context)
        try:
            text, chat, ids = convert.prompt_parts(request.prompt, info, self.fe.cfg.limits)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        call = TokenizeCall(0, text=text, chat=chat, token_ids=ids)
        result = await self.fe.tokenize(call, context)
        return model_pb2.TokenizeResponse(token_ids=result.token_ids or [])

    async def Detokenize(
        self, request: model_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> model_pb2.DetokenizeResponse:
        await self.fe.check_available(context)
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        call = TokenizeCall(
            0, token_ids=list(request.token_ids), detokenize=True, skip_special_tokens=skip
        )
        result = await self.fe.tokenize(call, context)
        return model_pb2.DetokenizeResponse(text=result.text or "")


_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class MalformedRequest:
    """A request body that protobuf could not parse (e.g. invalid UTF-8 in a string field)."""

    def __init__(self, message: str) -> None:
        self.message = message


class RejectMalformed(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Answers requests that do not parse with INVALID_ARGUMENT naming the field.

    Left alone, grpc answers UNKNOWN ("Unexpected DecodeError"). Applies to the unary-request
    methods of our own services: their deserializer returns a MalformedRequest instead of
    raising, and the wrapped handler aborts when it gets one.
    """

    def __init__(self, service_names: tuple[str, ...]) -> None:
        pool = generation_pb2.DESCRIPTOR.pool
        self.inputs: dict[str, Descriptor] = {
            f"/{name}/{method.name}": method.input_type
            for name in service_names
            for method in pool.FindServiceByName(name).methods
        }
        self._wrapped: dict[str, tuple[_Handler, _Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        desc = self.inputs.get(method)
        if handler is None or desc is None or handler.request_streaming:
            return handler
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, _lenient(handler, desc))
            self._wrapped[method] = cached
        return cached[1]


def _lenient(handler: _Handler, desc: Descriptor) -> _Handler:
    """`handler` with a deserializer that does not raise and a check for MalformedRequest."""
    deserialize = handler.request_deserializer
    assert deserialize is not None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as e:
            field = convert.bad_utf8_field(desc, data)
            if field is not None:
                return MalformedRequest(f"{field}: is not valid UTF-8")
            return MalformedRequest(f"request: not a valid {desc.full_name} ({e})")

    async def reject(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if isinstance(request, MalformedRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)

    if handler.response_streaming:
        behavior: Any = handler.unary_stream  # typed for sync servers in grpc-stubs

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await reject(request, context)
            async for response in behavior(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, parse, handler.response_serializer
        )
    unary: Any = handler.unary_unary

    async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await reject(request, context)
        return await unary(request, context)

    return grpc.unary_unary_rpc_method_handler(unary_unary, parse, handler.response_serializer)


OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
"""Methods that need no API key: health (probes and load balancers carry no key) and server
reflection (it tells only the schema, which proto/ publishes anyway; grpcurl needs it to call
even health without a .proto file)."""


class RequireApiKey(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """With API keys configured, every call but health and reflection (OPEN_PREFIXES) must
    carry `authorization: Bearer <key>` with one of them; others get UNAUTHENTICATED, and a
    warning is logged with the method, the peer and what was wrong, never the key."""

    def __init__(self, keys: KeyCheck) -> None:
        self.keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata or ()
        header = next((str(v) for k, v in metadata if k == AUTH_HEADER), None)
        problem = self.keys.problem(header)
        handler = await continuation(handler_call_details)
        if problem is None or handler is None:
            return handler
        return _refusal(handler, method, problem)


def _refusal(handler: _Handler, method: str, problem: str) -> _Handler:
    """A handler of `handler`'s kind that logs the refusal and answers UNAUTHENTICATED,
    without parsing the request."""

    async def refuse(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        log.warning("refused %s from %s: %s", method, context.peer(), problem)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

    def ignore(data: bytes) -> None:
        return None

    serialize = handler.response_serializer
    if handler.request_streaming:

        async def stream_in(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await refuse(context)

        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(stream_in, ignore, serialize)
        return grpc.stream_unary_rpc_method_handler(stream_in, ignore, serialize)
    if handler.response_streaming:

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await refuse(context)
            yield  # never reached: an async generator, as a streaming handler must be

        return grpc.unary_stream_rpc_method_handler(unary_stream, ignore, serialize)

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await refuse(context)

    return grpc.unary_unary_rpc_method_handler(unary, ignore, serialize)


def server_options(cfg: ServerConfig) -> list[tuple[str, int]]:
    """Message size limits, keepalive policy and connection age for the gRPC server."""
    return [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", cfg.max_message_bytes),
        # Accept client keepalive pings as often as every 10 s, also without active calls.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 3),
        # Ping idle clients every 2 min; drop them if no answer within 20 s.
        ("grpc.keepalive_time_ms", 120_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.max_connection_age_ms", int(cfg.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(cfg.shutdown_grace_s * 1000)),
        # No second server on a busy port (gRPC's default lets two share it, alternating calls).
        ("grpc.so_reuseport", 0),
    ]


def build_server(fe: Frontend, extra: Sequence[ExtraService] = ()) -> grpc.aio.Server:
    """The grpc.aio server with every service, health and reflection registered; `extra`
    services (sglang's, server/sglang_service.py) get the same interceptors and health."""
    keys = KeyCheck(fe.cfg.api_keys)
    fe.service_names = (*SERVICE_NAMES, *(name for name, _ in extra))
    interceptors: list[grpc.aio.ServerInterceptor[Any, Any]] = [RejectMalformed(fe.service_names)]
    if keys:  # first: a call without a key is refused before its request is parsed
        interceptors.insert(0, RequireApiKey(keys))
    if fe.metrics is not None:  # first, so that it counts every call, refused ones too
        interceptors.insert(0, CountRpcs(fe.metrics))
    server = grpc.aio.server(options=server_options(fe.cfg), interceptors=interceptors)
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(fe), server)
    model_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(fe), server)
    for _, register in extra:
        register(server)
    health_pb2_grpc.add_HealthServicer_to_server(fe.health, server)
    reflection.enable_server_reflection(
        (
            *fe.service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    return server
