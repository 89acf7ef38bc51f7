"""The frontend's metrics: RPCs by method and status code, requests by finish reason, and the
latencies a client sees (TTFT, inter-token, end to end). Served with the scheduler's engine
metrics on `--metrics-port` (see minisgl.metrics for how the two processes share it)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from minisgl.metrics import TIME_BUCKETS, MetricsServer, multiprocess_registry

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class RpcMetrics:
    """The frontend's metrics, in `registry` (which also reads the scheduler's files)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter, Histogram

        self.registry = registry
        self.rpcs = Counter(
            "minisgl:grpc_requests",
            "gRPC calls that ended, by method and status code.",
            ["method", "code"],
            registry=registry,
        )
        self.finished = Counter(
            "minisgl:request_success",
            "Generation requests that finished, by finish reason (stop, length, abort).",
            ["finished_reason"],
            registry=registry,
        )
        self.ttft = Histogram(
            "minisgl:time_to_first_token_seconds",
            "Seconds from a generation call's arrival to its first token.",
            buckets=TIME_BUCKETS,
            registry=registry,
        )
        self.itl = Histogram(
            "minisgl:inter_token_latency_seconds",
            "Seconds between a request's consecutive tokens (one per token after the first).",
            buckets=TIME_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            "minisgl:e2e_request_latency_seconds",
            "Seconds from a generation call's arrival to its last token.",
            buckets=TIME_BUCKETS,
            registry=registry,
        )


def start_metrics(host: str, port: int, directory: str) -> tuple[RpcMetrics, MetricsServer]:
    """The frontend's metrics and their HTTP server, which also serves `directory`'s files."""
    metrics = RpcMetrics(multiprocess_registry(directory))
    server = MetricsServer(host, port, metrics.registry)
    log.info("metrics on http://%s:%d/metrics", host, port)
    return metrics, server


class RequestTimer:
    """One generation call's timing: TTFT, inter-token gaps, duration."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.first: float | None = None
        self.last = self.start
        self.gaps: list[float] = []

    def tokens(self, n: int) -> None:
        """`n` tokens arrived now (a delta may carry several: the gap is shared among them)."""
        if n <= 0:
            return
        now = time.monotonic()
        if self.first is None:
            self.first = now
            n -= 1
        if n > 0:
            self.gaps.extend([(now - self.last) / n] * n)
        self.last = now

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.start

    def observe(self, metrics: RpcMetrics, finish_reason: str | None) -> None:
        if self.first is not None:
            metrics.ttft.observe(self.first - self.start)
            for gap in self.gaps:
                metrics.itl.observe(gap)
        if finish_reason is not None:  # to the last token; without one, to this end
            end = self.last if self.first is not None else time.monotonic()
            metrics.e2e.observe(end - self.start)
            metrics.finished.labels(finish_reason).inc()


def _code_name(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> str:
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):  # grpc.aio may keep the raw number
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))
    return "UNKNOWN" if error is not None else "OK"


class CountRpcs(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts every unary-request call (our services and health) by method and final code."""

    def __init__(self, metrics: RpcMetrics) -> None:
        self.metrics = metrics
        self._wrapped: dict[str, tuple[_Handler, _Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._counted(handler, method))
            self._wrapped[method] = cached
        return cached[1]

    def _counted(self, handler: _Handler, method: str) -> _Handler:
        counter = self.metrics.rpcs

        def count(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> None:
            counter.labels(method, _code_name(context, error)).inc()

        if handler.response_streaming:
            behavior: Any = handler.unary_stream

            async def unary_stream(request: Any, context: Any) -> Any:
                error: BaseException | None = None
                try:
                    async for response in behavior(request, context):
                        yield response
                except BaseException as e:
                    error = e
                    raise
                finally:
                    count(context, error)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        unary: Any = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            error: BaseException | None = None
            try:
                return await unary(request, context)
            except BaseException as e:
                error = e
                raise
            finally:
                count(context, error)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
