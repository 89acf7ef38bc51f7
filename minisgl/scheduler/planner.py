"""Which requests run in the next step, and how many new tokens each.

Decodes first (one token each, retracting the newest requests back to the queue if the pool
cannot hold the pages those tokens need), then prefills in progress, then waiting requests in
the AdmissionPolicy's order while rows, pages and the chunked-prefill token budget allow. An
admitted request reuses its longest cached prefix and gets pages for the rest of its prompt at
once.
"""

from __future__ import annotations

import logging
from collections import deque

from minisgl.scheduler.pages import KVPages
from minisgl.scheduler.policy import AdmissionPolicy
from minisgl.scheduler.request import Req

log = logging.getLogger(__name__)

Plan = list[tuple[Req, int]]  # (request, number of new tokens) pairs of one step


class BatchPlanner:
    """Owns the waiting queue and the running batch; plans each step over them."""

    def __init__(
        self, kv: KVPages, policy: AdmissionPolicy, chunked_prefill_size: int, max_model_len: int
    ) -> None:
        self.kv = kv
        self.policy = policy
        self.chunked_prefill_size = chunked_prefill_size
        self.max_model_len = max_model_len
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []  # in admission order: retraction takes from the end
        self.retractions = 0
        self.prompt_tokens = 0  # of admitted requests, counted at their first admission
        self.cached_tokens = 0  # of those prompts, found in the prefix cache

    def plan(self) -> Plan:
        """Pick this step's (request, number of new tokens) pairs."""
        retractions = self.retractions
        plan = [(r, 1) for r in self._plan_decodes()]
        budget = self.chunked_prefill_size
        for req in self.running:
            remaining = req.seq_len - req.num_computed
            if remaining > 1 and budget > 0:
                n = min(remaining, budget)
                plan.append((req, n))
                budget -= n
        if budget > 0 and self.retractions == retractions:  # none while short of pages
            plan += self._admit(budget)
        self.policy.decay()
        return plan

    def _may_continue(self, req: Req) -> bool:
        """Whether another token may follow the (possibly unread) tokens the request has."""
        return req.remaining_new_tokens > 0 and req.seq_len < self.max_model_len

    def _plan_decodes(self) -> list[Req]:
        """Decoding requests, with a page for each token; retracts the newest if pages run out."""
        ps = self.kv.page_size
        while True:
            decodes: list[Req] = []
            need: list[Req] = []
            for r in self.running:
                seq_len = len(r.prompt_ids) + len(r.output_ids)
                if r.num_computed == seq_len - 1 and self._may_continue(r):
                    decodes.append(r)
                    if seq_len > len(r.pages) * ps:
                        need.append(r)
            if len(need) <= self.kv.available:
                break
            self.retract(self.running[-1])
        self.kv.grow_each(need)
        return decodes

    def retract(self, req: Req) -> None:
        """Send a running request back to the front of the queue, keeping what the cache can."""
        self.kv.release(req, cache_it=True)
        self.running.remove(req)
        req.num_computed = 0
        self.waiting.appendleft(req)
        self.retractions += 1
        self.policy.on_retract()
        log.debug("retracted %s (%d tokens)", req.rid, req.seq_len)

    def _admit(self, budget: int) -> Plan:
        """Admit waiting requests while rows, pages and the token budget allow."""
        plan: Plan = []
        reserve = self.policy.reserve(self.running)
        for req in self.policy.order(self.waiting, self.kv.cache):
            if budget <= 0 or not self.kv.free_rows:
                break
            if req.resolved_len < req.seq_len:
                # Retracted with its newest token still in flight: not every id is known,
                # so its prefix cannot be matched yet. (A step that retracts admits nobody
                # and the token is read back before the next plan: this only guards that.)
                continue
            prefix_pages, node = self.kv.match(req)
            new_pages = self.kv.pages_for(req.seq_len) - len(prefix_pages)
            future = self.policy.future_pages(req)
            if self.kv.available - reserve < new_pages + future:
                self.kv.cache.unlock(node)
                break
            self.waiting.remove(req)
            self.kv.admit(req, prefix_pages, node, new_pages)
            if req.cached_tokens < 0:
                req.cached_tokens = req.num_computed
                self.prompt_tokens += len(req.prompt_ids)
                self.cached_tokens += req.num_computed
            self.running.append(req)
            reserve += future
            n = min(req.seq_len - req.num_computed, budget)
            plan.append((req, n))
            budget -= n
        return plan
