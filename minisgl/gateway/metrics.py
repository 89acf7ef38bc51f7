"""The gateway's Prometheus metrics (`minisgl gateway --metrics-port`): HTTP requests by
route, method and status (499: the client hung up first), and their latency (to the last
byte: a stream's whole length)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry, Counter, Histogram

from minisgl.metrics import TIME_BUCKETS

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CLIENT_CLOSED = 499
"""The status counted for a request whose client disconnected before its response ended
(nginx's "client closed request"); a 500 is left to the gateway's own failures."""


class GatewayMetrics:
    """The gateway's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "minisgl:gateway_http_requests",
            "HTTP requests answered, by route, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "minisgl:gateway_http_request_duration_seconds",
            "Seconds from an HTTP request's arrival to the end of its response, by route.",
            ["route"],
            buckets=TIME_BUCKETS,
            registry=self.registry,
        )

    def middleware(self) -> Middleware:
        """The outermost middleware: it sees each request's final status (errors included)."""

        @web.middleware
        async def count(request: web.Request, handler: _Handler) -> web.StreamResponse:
            start = time.monotonic()
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as e:
                status = e.status
                raise
            except (asyncio.CancelledError, ConnectionError):
                status = CLIENT_CLOSED  # the client hung up: not an error of the gateway's
                raise
            finally:
                info = request.match_info.route.resource
                route = info.canonical if info is not None else "unmatched"  # bounded labels
                self.requests.labels(route, request.method, str(status)).inc()
                self.latency.labels(route).observe(time.monotonic() - start)

        return count
