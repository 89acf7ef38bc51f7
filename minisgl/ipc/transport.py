"""ZeroMQ PUSH/PULL sockets over ipc:// paths that carry msgspec-encoded Messages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from minisgl.ipc.messages import Message

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)


@dataclass(frozen=True)
class Endpoints:
    """The ipc:// addresses of one server instance, all inside its own private directory."""

    root: Path

    def _addr(self, name: str) -> str:
        return f"ipc://{self.root / name}"

    @property
    def tokenizer(self) -> str:
        return self._addr("tokenizer")

    @property
    def scheduler(self) -> str:
        return self._addr("scheduler")

    @property
    def detokenizer(self) -> str:
        return self._addr("detokenizer")

    @property
    def frontend(self) -> str:
        return self._addr("frontend")


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Message:
    return _decoder.decode(data)


class Receiver:
    """A bound PULL socket (many senders may connect to it)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], addr: str) -> None:
        self.sock = ctx.socket(zmq.PULL)
        self.sock.bind(addr)

    def recv(self, timeout_ms: int | None) -> Message | None:
        """Next message, waiting up to timeout_ms (None: forever, 0: not at all)."""
        if timeout_ms is not None and not self.sock.poll(timeout_ms):
            return None
        return decode(self.sock.recv())

    def recv_all(self, timeout_ms: int | None) -> list[Message]:
        """Everything queued; waits up to timeout_ms for the first message."""
        first = self.recv(timeout_ms)
        if first is None:
            return []
        out = [first]
        while self.sock.poll(0):
            out.append(decode(self.sock.recv()))
        return out


class Sender:
    """A connected PUSH socket."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], addr: str) -> None:
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.connect(addr)

    def send(self, msg: Message) -> None:
        self.sock.send(encode(msg))


class AsyncReceiver:
    """A bound PULL socket for asyncio code (the frontend)."""

    def __init__(self, ctx: zmq.asyncio.Context, addr: str) -> None:
        self.sock = ctx.socket(zmq.PULL)
        self.sock.bind(addr)

    async def recv(self) -> Message:
        return decode(await self.sock.recv())


class AsyncSender:
    """A connected PUSH socket for asyncio code; sends never block (queue in ZeroMQ)."""

    def __init__(self, ctx: zmq.asyncio.Context, addr: str) -> None:
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.connect(addr)

    def send(self, msg: Message) -> None:
        self.sock.send(encode(msg), flags=zmq.NOBLOCK)
