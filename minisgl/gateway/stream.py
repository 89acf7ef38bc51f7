"""Server-sent events of a request's StreamGenerate calls, one per choice, interleaved as
their messages come."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, TypeAlias

import grpc
from aiohttp import web

from minisgl.gateway.errors import internal_error, rpc_error
from minisgl.gateway.requests import Completion
from minisgl.gateway.responses import ToolCallStream, stream_choice, usage_body
from minisgl.v1 import common_pb2

log = logging.getLogger(__name__)

#: What a call's reader puts on the queue: (choice, message), (choice, EOF) or (-1, error).
_Queue: TypeAlias = asyncio.Queue[tuple[int, Any]]


async def _event(resp: web.StreamResponse, data: dict[str, Any]) -> None:
    await resp.write(f"data: {json.dumps(data)}\n\n".encode())


class _Chunks:
    """Writes the chunks of one response (the fields every chunk repeats are fixed here)."""

    def __init__(self, resp: web.StreamResponse, c: Completion, model: str, created: int) -> None:
        self.resp = resp
        self.include_usage = c.include_usage
        self.head = {
            "id": c.rid,
            "object": "chat.completion.chunk" if c.chat else "text_completion",
            "created": created,
            "model": model,
        }

    async def send(
        self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None
    ) -> None:
        chunk: dict[str, Any] = {**self.head, "choices": choices}
        if self.include_usage:
            chunk["usage"] = usage
        await _event(self.resp, chunk)


async def _read(queue: _Queue, i: int, call: Any, msg: Any) -> None:
    """Feed the queue with call i's messages from `msg` (its first) on, then its EOF."""
    try:
        while msg is not grpc.aio.EOF:  # type: ignore[attr-defined]
            await queue.put((i, msg))
            msg = await call.read()
        await queue.put((i, msg))
    except grpc.aio.AioRpcError as e:
        await queue.put((-1, e))


async def _relay(queue: _Queue, chunks: _Chunks, c: Completion, n: int) -> None:
    """Send each message of the n calls as it comes; the usage chunk once all have ended."""
    usages: list[common_pb2.Usage] = []
    offsets = [0] * n  # completions' text_offset, per choice
    tools = ToolCallStream() if c.tool_call else None
    open_calls = n
    while open_calls:
        i, msg = await queue.get()
        if isinstance(msg, grpc.aio.AioRpcError):
            raise msg
        if msg is grpc.aio.EOF:  # type: ignore[attr-defined]
            open_calls -= 1
            continue
        if tools is not None:
            choice = tools.choice(i, msg)
        else:
            choice, offsets[i] = stream_choice(c, i, msg, offsets[i])
        if choice is not None:
            await chunks.send([choice])
        if msg.HasField("usage"):
            usages.append(msg.usage)
    if c.include_usage and len(usages) == n:
        await chunks.send([], usage_body(usages))


async def stream_response(
    request: web.Request, calls: list[Any], c: Completion, model: str, created: int
) -> web.StreamResponse:
    """The event stream of `calls` (the caller cancels them). An error before any output
    (each call's first message) is raised; one after the headers is a last `error` event."""
    firsts = await asyncio.gather(*(call.read() for call in calls))
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    chunks = _Chunks(resp, c, model, created)
    if c.chat:
        role = {"role": "assistant", "content": ""}
        await chunks.send(
            [{"index": i, "delta": role, "finish_reason": None} for i in range(len(calls))]
        )
    queue: _Queue = asyncio.Queue()
    tasks = [
        asyncio.create_task(_read(queue, i, call, first))
        for i, (call, first) in enumerate(zip(calls, firsts, strict=True))
    ]
    try:
        await _relay(queue, chunks, c, len(calls))
    except grpc.aio.AioRpcError as e:  # after the headers: report it in the stream
        await _event(resp, rpc_error(e, c.body, c.chat).body())
    except ConnectionError:
        raise
    except Exception:  # a bug: the headers are sent, so it can only end the stream
        log.exception("unexpected error in the stream of %s", c.rid)
        await _event(resp, internal_error().body())
    finally:
        for task in tasks:
            task.cancel()
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp
