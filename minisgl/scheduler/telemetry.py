"""What the scheduler process reports about its work: engine metrics (with --metrics-port)
and a periodic throughput log line while it is busy. Read from the scheduler's own counters
(`Scheduler.stats`) and the steps it runs; it changes nothing in the scheduler."""

from __future__ import annotations

import logging
import time

from minisgl.ipc.messages import TokenOut
from minisgl.metrics import EngineMetrics
from minisgl.scheduler.scheduler import Scheduler

log = logging.getLogger(__name__)


class Telemetry:
    """Feeds `metrics` (None: metrics off) and logs throughput every `log_interval_s` seconds
    of activity (0: never). Counters count from its creation, after the warm-up."""

    def __init__(
        self, sched: Scheduler, metrics: EngineMetrics | None, log_interval_s: float
    ) -> None:
        self.sched = sched
        self.metrics = metrics
        self.log_interval_s = log_interval_s
        self._last = sched.stats()  # what the counters have been given so far
        self._queued: dict[str, float] = {}  # rid -> when it reached the scheduler
        self._computed = self._last.computed_tokens  # the scheduler's count after the last call
        self._prev_computed = 0  # tokens computed by the step launched by the previous call
        self._generated = 0
        self._log_stats = self._last
        self._log_generated = 0
        self._log_time = time.monotonic()

    def added(self, rid: str) -> None:
        """A request was queued (for its queue time)."""
        if self.metrics is not None:
            self._queued[rid] = time.monotonic()

    def aborted(self, rid: str) -> None:
        self._queued.pop(rid, None)

    def stepped(self, seconds: float, outputs: list[TokenOut]) -> None:
        """One `Scheduler.step()` call took `seconds` and returned `outputs`.

        The step kind: without overlap the outputs are those of the batch this call launched,
        with it those of the previous call's batch. A batch that only decoded computed one
        token per output; more tokens computed than outputs means it held prompt tokens.
        """
        tokens = sum(1 for o in outputs if o.token_id >= 0)
        self._generated += tokens
        m = self.metrics
        if m is None:
            return
        total = self.sched.stats().computed_tokens
        computed, self._computed = total - self._computed, total
        launched = self._prev_computed if self.sched.overlap else computed
        self._prev_computed = computed
        if computed:
            m.iteration_tokens.observe(computed)
        if outputs:
            m.batch_size.observe(len(outputs))
        if launched > len(outputs):
            m.prefill_step.observe(seconds)
        elif outputs:
            m.decode_step.observe(seconds)
        m.generation_tokens.inc(tokens)
        if self._queued:
            # Admitted in this call: now running, or already finished (one token, or a stop
            # on the first) and then only among the outputs. Admission is at the call's start.
            admitted = time.monotonic() - seconds
            rids = [req.rid for req in self.sched.running] + [o.rid for o in outputs]
            for rid in rids:
                queued = self._queued.pop(rid, None)
                if queued is not None:
                    m.queue_time.observe(max(0.0, admitted - queued))

    def update(self) -> None:
        """Refresh the gauges and counters from the scheduler's; log throughput when due."""
        s = self.sched.stats()
        m = self.metrics
        if m is not None:
            last = self._last
            m.running.set(s.running)
            m.waiting.set(s.waiting)
            m.kv_usage.set(s.pool_usage)
            m.hit_rate.set(s.cache_hit_rate)
            m.prompt_tokens.inc(s.prompt_tokens - last.prompt_tokens)
            m.cached_tokens.inc(s.cached_tokens - last.cached_tokens)
            m.retractions.inc(s.retractions - last.retractions)
            self._last = s
        now = time.monotonic()
        if self.log_interval_s <= 0 or now - self._log_time < self.log_interval_s:
            return
        prev, elapsed = self._log_stats, now - self._log_time
        generated = self._generated - self._log_generated
        prompt = s.prompt_tokens - prev.prompt_tokens
        self._log_stats, self._log_generated, self._log_time = s, self._generated, now
        if not (generated or prompt or s.running or s.waiting):
            return  # idle: nothing to say
        log.info(
            "throughput: prompt %.1f tok/s, generation %.1f tok/s, running %d, waiting %d, "
            "KV usage %.1f%%, cache hit rate %.1f%%",
            prompt / elapsed,
            generated / elapsed,
            s.running,
            s.waiting,
            100 * s.pool_usage,
            100 * s.cache_hit_rate,
            extra={
                "fields": {
                    "prompt_tokens_per_s": round(prompt / elapsed, 3),
                    "generation_tokens_per_s": round(generated / elapsed, 3),
                    "running": s.running,
                    "waiting": s.waiting,
                    "kv_usage": round(s.pool_usage, 6),
                    "cache_hit_rate": round(s.cache_hit_rate, 6),
                }
            },
        )
