"""Admission policy: the order waiting requests are admitted in, and the page reserve kept for
the running requests' future tokens."""

from __future__ import annotations

import math
from collections.abc import Iterable

from minisgl.kvcache.prefix import PrefixCache
from minisgl.scheduler.request import Req

#: Share of their remaining max_new_tokens that running requests are assumed to still need
#: when admitting more work; it decays towards MIN while nothing is retracted.
INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = 0.001
#: Above this many waiting requests, longest-prefix-first falls back to FCFS.
LPM_MAX_QUEUE = 128


class AdmissionPolicy:
    """FCFS or LPM (longest cached prefix first) order, and the new-token-ratio reserve."""

    def __init__(self, policy: str, page_size: int) -> None:
        self.policy = policy
        self.page_size = page_size
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO

    def order(self, waiting: Iterable[Req], cache: PrefixCache) -> list[Req]:
        """Waiting requests in admission order (LPM: longest cached prefix first, stable)."""
        queue = list(waiting)
        if self.policy == "lpm" and len(queue) <= LPM_MAX_QUEUE:
            queue.sort(key=lambda r: -cache.match_len(r.token_slice(0, r.seq_len - 1)))
        return queue

    def future_pages(self, req: Req) -> int:
        """Pages the request is expected to need for its remaining tokens."""
        return math.ceil(self.new_token_ratio * req.remaining_new_tokens / self.page_size)

    def reserve(self, running: Iterable[Req]) -> int:
        """Pages the running requests are expected to need for their remaining tokens."""
        growth = sum(r.remaining_new_tokens for r in running)
        return math.ceil(self.new_token_ratio * growth / self.page_size)

    def decay(self) -> None:
        """After each step: a little less reserve while nothing is retracted."""
        self.new_token_ratio = max(
            MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY
        )

    def on_retract(self) -> None:
        """A request had to be retracted: back to the full reserve."""
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
