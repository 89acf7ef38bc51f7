"""Prometheus metrics of the engine (the scheduler process), and the HTTP endpoint that serves
them. No torch here: the frontend and the gateway import this module too.

Multi-process design: the scheduler process owns the engine's metrics and the frontend owns
the RPC metrics (`minisgl.server.metrics`). The scheduler runs prometheus-client's
multiprocess mode: `PROMETHEUS_MULTIPROC_DIR` is set in its environment (only there, before
it imports prometheus_client; `enable_multiprocess`) to a directory in the server's private
temporary directory, and every value it records goes to a memory-mapped file there. The
frontend keeps its own metrics in an ordinary in-process registry and adds a
`MultiProcessCollector` over that directory, so one scrape of its /metrics port returns both,
each from the process that counts it, with no message on the request path. (A periodic message
from the scheduler would have to carry histogram buckets and would lag by its period.)

The names follow vLLM's (`vllm:...`) and SGLang's (`sglang:...`) under the `minisgl:` prefix,
so dashboards made for those map over; README.md lists them all.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

TIME_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
"""Seconds: from a fast decode step to a long request (vLLM's latency buckets)."""
STEP_BUCKETS = (
    0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.0, 5.0,
)  # fmt: skip
"""Seconds of one scheduler step."""
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
"""Requests in one step."""
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
"""Tokens computed in one step."""


def enable_multiprocess(directory: str) -> None:
    """Make this process record its metrics into files in `directory` (see the module doc).

    Must run before prometheus_client is imported in this process: the library picks how it
    stores values at import time.
    """
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before its multiprocess directory")
    os.environ[MULTIPROC_ENV] = directory


class EngineMetrics:
    """The scheduler's metrics, recorded from its own counters (multiprocess mode)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, registry=None, multiprocess_mode="mostrecent")

        self.running = gauge("minisgl:num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("minisgl:num_requests_waiting", "Requests waiting to be admitted.")
        self.kv_usage = gauge(
            "minisgl:kv_cache_usage_perc",
            "Fraction of KV cache pages in use (by requests or the prefix cache), 0..1.",
        )
        self.hit_rate = gauge(
            "minisgl:cache_hit_rate",
            "Prompt tokens served from the radix (prefix) cache / prompt tokens, since the "
            "warm-up.",
        )
        self.prompt_tokens = Counter(
            "minisgl:prompt_tokens", "Prompt tokens of admitted requests.", registry=None
        )
        self.cached_tokens = Counter(
            "minisgl:cached_tokens",
            "Prompt tokens whose KV came from the radix cache at admission.",
            registry=None,
        )
        self.generation_tokens = Counter(
            "minisgl:generation_tokens", "Tokens generated.", registry=None
        )
        self.retractions = Counter(
            "minisgl:num_retractions",
            "Running requests sent back to the queue because KV pages ran out.",
            registry=None,
        )
        self.queue_time = Histogram(
            "minisgl:request_queue_time_seconds",
            "Seconds from a request reaching the scheduler to its admission.",
            buckets=TIME_BUCKETS,
            registry=None,
        )
        self.prefill_step = Histogram(
            "minisgl:prefill_step_time_seconds",
            "Seconds of a scheduler step whose batch computed prompt tokens.",
            buckets=STEP_BUCKETS,
            registry=None,
        )
        self.decode_step = Histogram(
            "minisgl:decode_step_time_seconds",
            "Seconds of a scheduler step whose batch only decoded (one token per request).",
            buckets=STEP_BUCKETS,
            registry=None,
        )
        self.batch_size = Histogram(
            "minisgl:batch_size",
            "Requests given a token in one step.",
            buckets=BATCH_BUCKETS,
            registry=None,
        )
        self.iteration_tokens = Histogram(
            "minisgl:iteration_tokens_total",
            "Tokens computed (prompt and decode) in one step.",
            buckets=TOKEN_BUCKETS,
            registry=None,
        )


def multiprocess_registry(directory: str) -> CollectorRegistry:
    """A registry that reads the metrics other processes wrote into `directory`."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry(auto_describe=True)
    MultiProcessCollector(registry, path=directory)
    return registry


class MetricsServer:
    """HTTP /metrics for `registry` on host:port, in a daemon thread (prometheus-client's)."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        from prometheus_client import start_http_server

        bare = host.removeprefix("[").removesuffix("]")
        try:
            self._server: Any
            self._thread: threading.Thread
            self._server, self._thread = start_http_server(port, bare, registry)
        except OSError as e:
            raise ValueError(f"--metrics-port {port}: cannot listen on {host} ({e})") from None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
