"""sglang's SubscribeKvEvents: the radix cache's stored and freed pages as smg's KvEventBatch.

The scheduler records each page the radix cache takes or frees (kvcache/radix.py) and sends
them to the frontend (KvEvents); here each message becomes one numbered KvEventBatch, kept in
a bounded history for subscribers that resume from a sequence number, and streamed to every
subscriber. A block is one KV page (page_size tokens, smg's --block-size must equal it); its
hash chains the hashes of the pages before it, its tokens let smg compute its own content
hashes (smg's positional KV index reads both).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

from smg_grpc_proto.generated import common_pb2 as smg_common

from minisgl.ipc.messages import KvEvents
from minisgl.kvcache.radix import BlocksStored

log = logging.getLogger(__name__)

HISTORY = 4096
"""Batches kept for subscribers that resume (start_sequence_number)."""
SUBSCRIBER_BACKLOG = 8192
"""Batches a subscriber may fall behind by; past that its stream ends (it resumes)."""


class KvEventLog:
    """Numbered batches of cache events, and the queues of their live subscribers."""

    def __init__(self) -> None:
        self.history: deque[smg_common.KvEventBatch] = deque(maxlen=HISTORY)
        self.sequence = 0
        """The number of the last batch (0: none yet)."""
        self._event_ids = itertools.count(1)
        self._subscribers: set[asyncio.Queue[smg_common.KvEventBatch | None]] = set()

    def add(self, msg: KvEvents) -> None:
        """Number `msg` as the next batch and hand it to every subscriber."""
        self.sequence += 1
        batch = smg_common.KvEventBatch(sequence_number=self.sequence, timestamp=time.time())
        for event in msg.events:
            out = batch.events.add(event_id=next(self._event_ids))
            if isinstance(event, BlocksStored):
                stored = out.stored
                if event.parent is not None:
                    stored.parent_block_hash = event.parent
                stored.tier = smg_common.KV_CACHE_TIER_DEVICE
                for h, tokens in event.blocks:
                    stored.blocks.add(block_hash=h, token_ids=tokens, block_size=msg.block_size)
            else:
                out.removed.block_hashes.extend(event.hashes)
                out.removed.tier = smg_common.KV_CACHE_TIER_DEVICE
        self.history.append(batch)
        for queue in list(self._subscribers):
            if queue.qsize() >= SUBSCRIBER_BACKLOG:
                log.warning(
                    "a KV-event subscriber fell %d batches behind; ending its stream", queue.qsize()
                )
                self._subscribers.discard(queue)
                queue.put_nowait(None)
            else:
                queue.put_nowait(batch)

    async def subscribe(self, start: int) -> AsyncIterator[smg_common.KvEventBatch]:
        """The kept batches numbered `start` and later (start 0: none), then live ones."""
        queue: asyncio.Queue[smg_common.KvEventBatch | None] = asyncio.Queue()
        self._subscribers.add(queue)  # and, with no await between, the history's snapshot:
        kept = [b for b in self.history if start > 0 and b.sequence_number >= start]
        last = self.sequence if start == 0 else start - 1
        try:
            for batch in kept:
                last = batch.sequence_number
                yield batch
            while True:
                batch = await queue.get()
                if batch is None:
                    return
                if batch.sequence_number > last:
                    last = batch.sequence_number
                    yield batch
        finally:
            self._subscribers.discard(queue)
