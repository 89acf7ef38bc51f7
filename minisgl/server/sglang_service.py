"""sglang.grpc.scheduler.SglangScheduler on minisgl's port, so smg (the Shepherd Model Gateway)
can drive minisgl as an SGLang worker.

smg tokenizes, applies chat templates and detokenizes itself; it sends token ids and reads
token ids back. Every Generate runs through the frontend's own pipeline (Frontend.generate):
validation, queue bound, cancellation, deadlines, drain, errors and API keys are those of
minisgl.v1. The stubs are smg-grpc-proto's (sglang_scheduler.proto, common.proto).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from smg_grpc_proto import sglang_scheduler_pb2 as sgl
from smg_grpc_proto import sglang_scheduler_pb2_grpc as sgl_grpc
from smg_grpc_proto.generated import common_pb2 as smg_common

from minisgl.ipc.messages import Delta
from minisgl.server import convert
from minisgl.server.frontend import ExtraService, Frontend
from minisgl.server.sglang_convert import (
    Sample,
    Unsupported,
    chunk,
    complete,
    sglang_field_names,
    to_minisgl,
)
from minisgl.server.sglang_info import (
    check_loads_request,
    engine_version,
    loads_response,
    scheduler_info,
    server_args,
)
from minisgl.server.sglang_kv_events import KvEventLog
from minisgl.server.sglang_tokenizer import Bundle, build_bundle
from minisgl.v1 import generation_pb2

log = logging.getLogger(__name__)

SERVICE_NAME: str = sgl.DESCRIPTOR.services_by_name["SglangScheduler"].full_name
CHUNK_BYTES = 64 * 1024
"""GetTokenizer's chunk size."""
IDLE_POLL_S = 0.05
"""FlushCache with a timeout: how often it looks whether the server has gone idle."""


def service(fe: Frontend, tokenizer: Path | None) -> ExtraService:
    """The service for build_server: its name and its registration."""
    servicer = SglangServicer(fe, tokenizer)

    def register(server: grpc.aio.Server) -> None:
        sgl_grpc.add_SglangSchedulerServicer_to_server(servicer, server)

    return SERVICE_NAME, register


class SglangServicer(sgl_grpc.SglangSchedulerServicer):  # type: ignore[misc]
    """The SglangScheduler RPCs minisgl implements; the others answer UNIMPLEMENTED."""

    def __init__(self, fe: Frontend, tokenizer: Path | None) -> None:
        self.fe = fe
        self.tokenizer = tokenizer
        self.started = time.time()
        self.in_flight: dict[str, set[str]] = {}
        """sglang request_id -> the frontend labels of its samples (Abort finds them here)."""
        self._bundle: Bundle | None = None
        self.kv_events = KvEventLog()
        fe.on_kv_events = self.kv_events.add

    async def Generate(
        self, request: sgl.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[sgl.GenerateResponse]:
        info = await self.fe.check_available(context)
        rid = request.request_id or uuid.uuid4().hex
        try:
            conv = to_minisgl(request)
            labels = [rid] if conv.n == 1 else [f"{rid}-{i}" for i in range(conv.n)]
            for label in labels:
                convert.check_request_id(label)
            convert.to_generate_req(conv.request, "0", info, self.fe.cfg.limits)
        except Unsupported as e:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, sglang_field_names(str(e)))
        requests = []
        for label in labels:
            one = generation_pb2.StreamGenerateRequest()
            one.CopyFrom(conv.request)
            one.request_id = label
            requests.append(one)
        await context.send_initial_metadata((("x-request-id", rid),))
        self.in_flight.setdefault(rid, set()).update(labels)
        samples = [Sample(i, [], []) for i in range(conv.n)]
        try:
            async for i, delta in self._deltas(requests, context):
                sample = samples[i]
                sample.add(delta)
                if conv.stream:
                    yield chunk(rid, sample, delta)
                if delta.finish_reason is not None:
                    yield complete(rid, sample, delta, conv.stream)
        finally:
            held = self.in_flight.get(rid)
            if held is not None:
                held.difference_update(labels)
                if not held:
                    del self.in_flight[rid]

    async def _deltas(
        self,
        requests: list[generation_pb2.StreamGenerateRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[tuple[int, Delta]]:
        """(sample index, delta) of every request, as they come. Several run as tasks of this
        call: an error in one (its abort status is set) ends the call, and the others are
        cancelled, which aborts them in the scheduler as a cancelled call does."""
        if len(requests) == 1:
            deltas = self.fe.generate(requests[0], context, False, sglang_field_names)
            async for delta in deltas:
                yield 0, delta
            return
        queue: asyncio.Queue[tuple[int, Delta | BaseException | None]] = asyncio.Queue()

        async def pump(i: int, req: generation_pb2.StreamGenerateRequest) -> None:
            try:
                async for delta in self.fe.generate(req, context, False, sglang_field_names):
                    queue.put_nowait((i, delta))
                queue.put_nowait((i, None))
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # grpc's AbortError among them: the handler re-raises
                queue.put_nowait((i, e))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
        try:
            done = 0
            while done < len(tasks):
                i, item = await queue.get()
                if item is None:
                    done += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def Abort(
        self, request: sgl.AbortRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sgl.AbortResponse:
        labels = sorted(self.in_flight.get(request.request_id, ()))
        found = [self.fe.abort_label(label) for label in labels]
        if any(found):
            why = f" ({request.reason})" if request.reason else ""
            log.info("abort of %s%s: %d samples", request.request_id, why, sum(found))
            return sgl.AbortResponse(success=True, message=f"{request.request_id} aborted")
        return sgl.AbortResponse(success=False, message=f"{request.request_id} not in flight")

    async def HealthCheck(
        self, request: sgl.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sgl.HealthCheckResponse:
        """Healthy while the server takes requests (the workers are alive and warm); while it
        warms up UNAVAILABLE, as if it were not up yet: smg registers a worker only once this
        answers, and would otherwise register it before it can tell its model."""
        if self.fe.state == "starting":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is warming up")
        serving = self.fe.state == "serving"
        return sgl.HealthCheckResponse(healthy=serving, message=self.fe.state)

    async def GetModelInfo(
        self, request: sgl.GetModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sgl.GetModelInfoResponse:
        info = await self.fe.check_available(context)
        return sgl.GetModelInfoResponse(
            model_path=info.model,
            tokenizer_path="",  # smg then fetches it with GetTokenizer (no shared disk needed)
            is_generation=True,
            served_model_name=info.model,
            max_context_length=info.context_length,
            vocab_size=info.vocab_size,
            supports_vision=False,
            eos_token_ids=info.eos_token_ids,
            max_req_input_len=info.context_length - 1,
            architectures=[info.architecture],
        )

    async def GetServerInfo(
        self, request: sgl.GetServerInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sgl.GetServerInfoResponse:
        info = await self.fe.check_available(context)
        start = Timestamp()
        start.FromSeconds(int(self.started))
        return sgl.GetServerInfoResponse(
            server_args=server_args(info, self.fe.cfg.max_queued_requests),
            scheduler_info=scheduler_info(info, self.fe.load),
            active_requests=len(self.fe.requests),
            is_paused=False,
            last_receive_timestamp=self.fe.last_receive,
            uptime_seconds=time.time() - self.started,
            sglang_version=engine_version(),
            server_type="grpc",
            start_time=start,
            max_total_num_tokens=info.kv_cache_tokens,
        )

    async def GetLoads(
        self, request: sgl.GetLoadsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sgl.GetLoadsResponse:
        info = await self.fe.check_available(context)
        try:
            check_loads_request(request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return loads_response(request, info, self.fe.load)

    async def GetTokenizer(
        self, request: smg_common.GetTokenizerRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[smg_common.GetTokenizerChunk]:
        """The tokenizer directory's files as one zip, in CHUNK_BYTES chunks; the last one
        carries the zip's SHA-256 (hex)."""
        await self.fe.check_available(context)
        if self.tokenizer is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "GetTokenizer: this model has no tokenizer (token-id prompts only)",
            )
        if self._bundle is None:
            try:
                self._bundle = await build_bundle(self.tokenizer)
            except (OSError, RuntimeError) as e:
                log.error("GetTokenizer: %s", e)
                await context.abort(grpc.StatusCode.INTERNAL, f"GetTokenizer: {e}")
        data, digest = self._bundle.data, self._bundle.sha256
        for start in range(0, len(data), CHUNK_BYTES):
            last = start + CHUNK_BYTES >= len(data)
            yield smg_common.GetTokenizerChunk(
                data=data[start : start + CHUNK_BYTES], sha256=digest if last else ""
            )

    async def FlushCache(
        self, request: smg_common.FlushCacheRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> smg_common.FlushCacheResponse:
        """Release the radix cache once no request is in flight, waiting up to timeout_s for
        that (0: only if idle now)."""
        await self.fe.check_available(context)
        if not 0 <= request.timeout_s < math.inf:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"timeout_s: must be a finite number >= 0, not {request.timeout_s}",
            )
        deadline = time.monotonic() + request.timeout_s
        while self.fe.requests and time.monotonic() < deadline:
            await asyncio.sleep(IDLE_POLL_S)
        if self.fe.requests:
            return smg_common.FlushCacheResponse(
                success=False,
                message=f"{len(self.fe.requests)} requests in flight (raise timeout_s to wait)",
            )
        released = await self.fe.release_cache()
        if released is None:
            return smg_common.FlushCacheResponse(
                success=False, message="the scheduler did not answer"
            )
        log.info("FlushCache: released %d cached pages", released.freed_pages)
        return smg_common.FlushCacheResponse(
            success=True,
            message=f"released {released.freed_pages} pages; {released.cached_pages} still held",
        )

    async def SubscribeKvEvents(
        self,
        request: smg_common.SubscribeKvEventsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[smg_common.KvEventBatch]:
        """The radix cache's stored and freed pages, batch by batch (sglang_kv_events.py),
        until the subscriber goes or the server stops."""
        await self.fe.check_available(context)
        await context.send_initial_metadata(())  # smg's client waits for the headers
        async for batch in self.kv_events.subscribe(request.start_sequence_number):
            yield batch

    async def Embed(
        self, request: sgl.EmbedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sgl.EmbedResponse:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, "Embed: minisgl serves generation models only"
        )
        raise AssertionError("unreachable")

    async def ListLoadedLoRAAdapters(
        self,
        request: sgl.ListLoadedLoRAAdaptersRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> sgl.ListLoadedLoRAAdaptersResponse:
        return sgl.ListLoadedLoRAAdaptersResponse()  # minisgl has no LoRA: none loaded
