"""The scheduler process: loads the model, warms up, then serves requests from ZeroMQ.

Faults: an error while handling one request's message (`add_request`: it checks everything
before it queues the request, so a failure leaves the scheduler as it was) fails that request
alone; bad input with "invalid_argument", anything else with "internal" and a logged traceback.
An error in a step (planning, the batched forward, sampling, reading tokens back) or in an
abort (both change the KV pages and batches every running request shares) is an engine fault:
the process logs it and exits with code 1, and the frontend fails every request and exits.
"""

from __future__ import annotations

import logging
import sys
import time

import zmq

from minisgl.config import EngineConfig
from minisgl.ipc.messages import (
    AbortReq,
    CacheReleased,
    KvEvents,
    Load,
    Message,
    ModelInfo,
    NewReq,
    ReleaseCache,
    ReqError,
    Shutdown,
    StepOut,
    TokenOut,
)
from minisgl.ipc.transport import Endpoints, Receiver, Sender
from minisgl.metrics import EngineMetrics, enable_multiprocess
from minisgl.sampling_params import SamplingParams
from minisgl.scheduler.engine import Engine, build_engine
from minisgl.scheduler.scheduler import Scheduler
from minisgl.scheduler.telemetry import Telemetry

log = logging.getLogger(__name__)

LOAD_INTERVAL_S = 0.02


def warm_up(sched: Scheduler) -> None:
    """One short generation so kernels are compiled before the first request; leaves no trace
    (in the cache or the counters)."""
    sched.add_request("warmup", [1] * 8, SamplingParams(temperature=0.0, max_new_tokens=4))
    while sched.has_work():
        sched.step()
    sched.release_all_cache()
    sched.reset_counters()
    sched.check_invariants()


def model_info(engine: Engine) -> ModelInfo:
    cfg, sched, mc = engine.scheduler.cfg, engine.scheduler, engine.source.config
    return ModelInfo(
        model=engine.source.name,
        architecture=mc.architecture,
        context_length=engine.max_model_len,
        vocab_size=mc.vocab_size,
        eos_token_ids=sorted(sched.eos_ids),
        has_tokenizer=engine.source.has_text_tokenizer,
        dtype=str(engine.runner.dtype).removeprefix("torch."),
        device=str(engine.runner.device),
        attention_backend=engine.runner.attn.name,
        page_size=cfg.page_size,
        kv_cache_tokens=sched.allocator.num_pages * cfg.page_size,
        radix_cache=sched.cache.keeps_pages,
        chunked_prefill_size=cfg.chunked_prefill_size,
        max_running_requests=cfg.max_running_requests,
    )


def _load(sched: Scheduler) -> Load:
    s = sched.stats()
    return Load(
        waiting=s.waiting,
        running=s.running,
        kv_usage=s.pool_usage,
        kv_busy=(s.total_pages - s.free_pages - sched.cache.evictable_pages) / s.total_pages,
        cache_hit_rate=s.cache_hit_rate,
        retractions=s.retractions,
        prompt_tokens=s.prompt_tokens,
        cached_tokens=s.cached_tokens,
    )


def add_request(sched: Scheduler, msg: NewReq) -> ReqError | None:
    """Queue one request; a ReqError for the frontend if it cannot run. Never raises."""
    try:
        sched.add_request(msg.rid, msg.input_ids, msg.params)
    except ValueError as e:
        return ReqError(msg.rid, "invalid_argument", str(e))
    except Exception as e:
        log.exception("unexpected error adding request %s", msg.rid)
        return ReqError(msg.rid, "internal", f"internal error: {type(e).__name__}: {e}")
    return None


def release_cache(sched: Scheduler, msg: ReleaseCache) -> CacheReleased:
    """Evict every prefix-cache entry no running request holds; say what is left."""
    before = sched.cache.cached_pages
    sched.release_all_cache()
    after = sched.cache.cached_pages
    return CacheReleased(msg.call_id, before - after, after)


def run_scheduler(
    cfg: EngineConfig,
    endpoints: Endpoints,
    tp_port: int | None = None,
    metrics_dir: str | None = None,
    log_stats_interval_s: float = 0.0,
) -> None:
    """Load, warm up, announce ModelInfo, then loop: take messages, step, send outputs.

    With tensor parallelism this is rank 0; the launcher starts the other ranks
    (`engine.run_follower`) with the same `tp_port`, and they follow this one. With
    `metrics_dir` (--metrics-port) it records the engine metrics there (minisgl.metrics);
    every `log_stats_interval_s` seconds while busy it logs its throughput (0: never).
    """
    metrics: EngineMetrics | None = None
    if metrics_dir is not None:
        enable_multiprocess(metrics_dir)  # before anything imports prometheus_client
        metrics = EngineMetrics()
    engine = build_engine(cfg, 0, tp_port)
    sched = engine.scheduler
    warm_up(sched)
    sched.grammar_source.prepare()  # so a first constrained request does not stall the loop
    sched.cache.record_events()  # for sglang's SubscribeKvEvents (server/sglang_kv_events.py)
    ctx = zmq.Context()
    inbox = Receiver(ctx, endpoints.scheduler)
    to_detok = Sender(ctx, endpoints.detokenizer)
    to_frontend = Sender(ctx, endpoints.frontend)
    to_frontend.send(model_info(engine))
    log.info("scheduler ready")
    try:
        _serve(sched, inbox, to_detok, to_frontend, Telemetry(sched, metrics, log_stats_interval_s))
    except Exception:
        log.exception("engine fault: the scheduler exits and every request fails")
        sys.exit(1)
    ctx.destroy(linger=0)
    engine.close()


def _serve(
    sched: Scheduler, inbox: Receiver, to_detok: Sender, to_frontend: Sender, telemetry: Telemetry
) -> None:
    """The serving loop, until Shutdown."""
    last_load: Load | None = None
    last_load_time = 0.0
    while True:
        msgs: list[Message] = inbox.recv_all(0 if sched.has_work() else 50)
        for msg in msgs:
            if isinstance(msg, Shutdown):
                return
            if isinstance(msg, NewReq):
                error = add_request(sched, msg)
                if error is not None:
                    to_frontend.send(error)
                else:
                    telemetry.added(msg.rid)
            elif isinstance(msg, AbortReq) and sched.abort(msg.rid):
                telemetry.aborted(msg.rid)
                abort = TokenOut(msg.rid, -1, None, None, "abort", None, 0, 0)
                to_detok.send(StepOut([abort]))
            elif isinstance(msg, ReleaseCache):
                to_frontend.send(release_cache(sched, msg))
        if sched.has_work():
            started = time.monotonic()
            outputs = sched.step()  # each request's first one carries its params
            telemetry.stepped(time.monotonic() - started, outputs)
            if outputs:
                to_detok.send(StepOut(outputs))
        events = sched.cache.take_events()
        if events:
            to_frontend.send(KvEvents(sched.page_size, events))
        now = time.monotonic()
        if now - last_load_time >= LOAD_INTERVAL_S:
            load = _load(sched)
            if load != last_load:
                to_frontend.send(load)
                last_load = load
            last_load_time = now
            telemetry.update()
