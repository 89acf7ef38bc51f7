"""The informational answers of sglang's SglangScheduler (GetServerInfo, GetLoads), built from
the frontend's ModelInfo and the scheduler's last Load (no I/O)."""

from __future__ import annotations

from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

from google.protobuf.struct_pb2 import Struct
from smg_grpc_proto import sglang_scheduler_pb2 as sgl

from minisgl.ipc.messages import Load, ModelInfo

LOAD_SECTIONS = frozenset({"core", "memory", "spec", "lora", "disagg", "queues", "all"})
"""GetLoadsRequest.include values sglang defines."""


def engine_version() -> str:
    """What GetServerInfo and GetLoads report as the engine's version."""
    try:
        return f"minisgl-{version('minisgl')}"
    except PackageNotFoundError:
        return "minisgl"


def server_args(info: ModelInfo, max_queued_requests: int) -> Struct:
    """GetServerInfo.server_args: how the server was started (smg copies some into its
    worker labels)."""
    args = Struct()
    args.update(
        {
            "model_path": info.model,
            "dtype": info.dtype,
            "device": info.device,
            "attention_backend": info.attention_backend,
            "page_size": info.page_size,
            "context_length": info.context_length,
            "radix_cache": info.radix_cache,
            "chunked_prefill_size": info.chunked_prefill_size,
            "max_running_requests": info.max_running_requests,
            "max_queued_requests": max_queued_requests,
        }
    )
    return args


def scheduler_info(info: ModelInfo, load: Load) -> Struct:
    """GetServerInfo.scheduler_info: the KV capacity and the prefix cache's counters since
    start (prompt tokens admitted, of those served from the cache)."""
    sched = Struct()
    sched.update(
        {
            "max_total_num_tokens": info.kv_cache_tokens,
            "page_size": info.page_size,
            "prompt_tokens": load.prompt_tokens,
            "cached_tokens": load.cached_tokens,
            "cache_hit_rate": load.cache_hit_rate,
            "retractions": load.retractions,
        }
    )
    return sched


def check_loads_request(request: sgl.GetLoadsRequest) -> None:
    """ValueError, naming the field, for sections sglang does not define or a rank but 0."""
    unknown = sorted(set(request.include) - LOAD_SECTIONS)
    if unknown:
        raise ValueError(
            f"include: unknown sections {', '.join(unknown)} "
            f"(known: {', '.join(sorted(LOAD_SECTIONS))})"
        )
    if request.HasField("dp_rank") and request.dp_rank != 0:
        raise ValueError(f"dp_rank: only rank 0 exists ({request.dp_rank})")


def loads_response(
    request: sgl.GetLoadsRequest, info: ModelInfo, load: Load
) -> sgl.GetLoadsResponse:
    """One SchedulerLoad (rank 0) from the scheduler's last Load, with the asked sections
    minisgl can fill (memory: the token capacity; queues: the waiting requests)."""
    capacity = info.kv_cache_tokens
    one = sgl.SchedulerLoad(
        dp_rank=0,
        num_running_reqs=load.running,
        num_waiting_reqs=load.waiting,
        num_total_reqs=load.running + load.waiting,
        num_used_tokens=round(load.kv_usage * capacity),
        max_total_num_tokens=capacity,
        token_usage=load.kv_usage,
        cache_hit_rate=load.cache_hit_rate,
        utilization=load.running / max(info.max_running_requests, 1),
        max_running_requests=info.max_running_requests,
    )
    sections = set(request.include) or {"all"}
    if sections & {"memory", "all"}:
        one.memory.CopyFrom(sgl.MemoryMetrics(token_capacity=capacity))
    if sections & {"queues", "all"}:
        one.queues.CopyFrom(sgl.QueueMetrics(waiting=load.waiting))
    return sgl.GetLoadsResponse(
        timestamp=datetime.now(timezone.utc).isoformat(),
        version=engine_version(),
        dp_rank_count=1,
        loads=[one],
        aggregate=sgl.AggregateMetrics(
            total_running_reqs=one.num_running_reqs,
            total_waiting_reqs=one.num_waiting_reqs,
            total_reqs=one.num_total_reqs,
            avg_token_usage=one.token_usage,
            avg_utilization=one.utilization,
        ),
    )
