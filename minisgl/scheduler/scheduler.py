"""Continuous batching with a radix prefix cache, chunked prefill and retraction.

Each step the scheduler
1. plans one token for every decoding request, retracting the newest requests back to the
   queue if the pool cannot hold the pages those tokens need;
2. continues prefills in progress, then admits waiting requests (FCFS or longest prefix
   first) while rows, pages and the chunked-prefill token budget allow; an admitted request
   reuses its longest cached prefix and gets pages for the rest of its prompt at once;
3. runs one forward over all of it (prefill chunks and decodes together), samples, and
   reports a TokenEvent for each request that produced a token.

Pages are free (in the allocator), cached (owned by the radix tree), or private to one
running request; `check_invariants` verifies that they add up.

Overlap scheduling: a step only launches its forward and sampling on the GPU, advances each
request as if its token were known (the token id is a placeholder, -1 - slot, for the slot of
`future` the sampled id is written to on the device), and then reads back the tokens of the
step before, which ran while the CPU was planning this one. The next step's input ids are
resolved from `future` on the GPU, so the CPU never waits for a step to end before planning
the next. A request that stops at a token the CPU has not seen yet is already in the next
step; that one extra token is dropped. Without overlap, each step reads back its own tokens
at once, through the same code.

Tensor parallelism: every rank runs its own Scheduler over its shard of the model and KV
cache. Only the leader (rank 0) is called from outside; it records each call that changes the
state (add, abort, cache release) and, at the start of every step, broadcasts them to the other
ranks, which replay them and step too (`follow`). Scheduling is deterministic given those calls
and the sampled tokens, and every rank samples the same tokens from the same gathered logits,
so all ranks make the same decisions without further messages.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from minisgl.config import EngineConfig
from minisgl.engine.cuda_graph import use_decode_graphs
from minisgl.engine.model_runner import ModelRunner
from minisgl.engine.sampler import SampleOutput
from minisgl.kvcache.allocator import PageAllocator
from minisgl.kvcache.pool import KVPool
from minisgl.kvcache.radix import RadixCache
from minisgl.sampling_params import SamplingParams
from minisgl.scheduler.batch import build_forward_batch, build_sampling_batch
from minisgl.scheduler.request import Req, TokenEvent
from minisgl.transfer import HostToDevice, to_host

log = logging.getLogger(__name__)

#: Share of their remaining max_new_tokens that running requests are assumed to still need
#: when admitting more work; it decays towards MIN while nothing is retracted.
INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = 0.001
#: Above this many waiting requests, longest-prefix-first falls back to FCFS.
LPM_MAX_QUEUE = 128


@dataclass
class SchedulerStats:
    """Load and cache counters (cumulative ones since start)."""

    waiting: int
    running: int
    free_pages: int
    cached_pages: int
    total_pages: int
    prompt_tokens: int
    cached_tokens: int
    computed_tokens: int
    retractions: int

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def pool_usage(self) -> float:
        return 1.0 - self.free_pages / self.total_pages


@dataclass
class _Launched:
    """A step whose forward and sampling were queued on the device, tokens not yet read."""

    plan: list[tuple[Req, int]]
    out_index: list[int]  # per row: index of its placeholder in req.output_ids, -1 if none
    sampled: SampleOutput  # host copies (pinned on CUDA), valid once `ready` has fired
    ready: torch.cuda.Event | None


def use_overlap(setting: str, device: torch.device) -> bool:
    """auto: overlap on CUDA only (on the CPU nothing runs asynchronously to overlap with)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


class Scheduler:
    """Owns the queues, the KV pool, its pages and the prefix cache; drives the ModelRunner."""

    def __init__(self, cfg: EngineConfig, runner: ModelRunner, max_model_len: int) -> None:
        self.cfg = cfg
        self.runner = runner
        self.max_model_len = max_model_len
        mc = runner.model_config
        self.vocab_size = mc.vocab_size
        self.eos_ids = frozenset(mc.eos_token_ids)
        self.page_size = cfg.page_size
        self.tp = runner.tp
        self._ops: list[tuple[Any, ...]] = []  # leader: calls not yet sent to the other ranks
        # Every rank must see the same pool size: the smallest any rank can hold.
        num_pages = self.tp.min_int(cfg.num_pages or self._auto_num_pages())
        self.pool = KVPool(
            mc.num_layers,
            num_pages,
            cfg.page_size,
            runner.num_kv_heads,
            mc.head_dim,
            runner.dtype,
            runner.device,
        )
        self.allocator = PageAllocator(num_pages)
        self.cache = None if cfg.disable_radix_cache else RadixCache(cfg.page_size, self.allocator)
        # One row per running request, plus a last row that points at the scratch page.
        self.page_table = torch.full(
            (cfg.max_running_requests + 1, -(-max_model_len // cfg.page_size)),
            self.pool.scratch_page,
            dtype=torch.int32,
            device=runner.device,
        )
        self.free_rows = list(range(cfg.max_running_requests - 1, -1, -1))
        self.overlap = use_overlap(cfg.overlap_schedule, runner.device)
        # Sampled ids of the last two steps, which placeholders point into (step k uses half
        # k % 2: a placeholder is resolved on the host before its half is written again).
        self.future = (
            torch.zeros(2 * cfg.max_running_requests, dtype=torch.int64, device=runner.device)
            if self.overlap
            else None
        )
        self._steps = 0
        self._token_digest = 0  # hash of every token read back (ranks compare it)
        self._in_flight: _Launched | None = None
        self.h2d = HostToDevice()
        if use_decode_graphs(runner.device, cfg.disable_cuda_graph, self.tp.size):
            runner.capture_decode_graphs(
                self.page_table,
                self.pool.k_caches,
                self.pool.v_caches,
                cfg.page_size,
                scratch_page=self.pool.scratch_page,
                scratch_row=cfg.max_running_requests,
                max_bs=min(cfg.cuda_graph_max_bs, cfg.max_running_requests),
            )
        elif runner.device.type == "cuda" and not cfg.disable_cuda_graph and self.tp.is_leader:
            log.info("tensor parallelism: decoding without CUDA graphs (see use_decode_graphs)")
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []  # in admission order: retraction takes from the end
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
        # Page-table entries to write before the next forward: (row, column) -> page. A dict,
        # so a cell written twice between flushes gets its last value (index_put_ with
        # duplicate indices on CUDA would pick one at random).
        self._table_writes: dict[tuple[int, int], int] = {}
        self._prompt_tokens = self._cached_tokens = self._computed_tokens = 0
        self._retractions = 0
        log.info(
            "KV cache: %d pages x %d tokens = %d tokens (%.2f GiB), radix cache %s, policy %s, "
            "overlap scheduling %s",
            num_pages,
            cfg.page_size,
            num_pages * cfg.page_size,
            num_pages * self._page_bytes() / 2**30,
            "off" if self.cache is None else "on",
            cfg.schedule_policy,
            "on" if self.overlap else "off",
        )

    # ----- sizing -------------------------------------------------------------------------

    def _page_bytes(self) -> int:
        mc = self.runner.model_config
        return KVPool.bytes_per_page(
            mc.num_layers, self.page_size, self.runner.num_kv_heads, mc.head_dim, self.runner.dtype
        )

    def _auto_num_pages(self) -> int:
        device = self.runner.device
        if device.type == "cuda":
            # The driver counts memory the caching allocator holds but no tensor uses as used.
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(device)
            used = total - free
            budget = int(total * self.cfg.mem_fraction) - used
            if budget <= 0:
                raise MemoryError(
                    f"no GPU memory left for the KV cache: {used / 2**30:.1f} GiB of "
                    f"{total / 2**30:.1f} in use, mem_fraction {self.cfg.mem_fraction}"
                )
        else:
            budget = int(self.cfg.cpu_kv_gib * 2**30)
        # Never more than every running request at full context could use.
        most = self.cfg.max_running_requests * -(-self.max_model_len // self.page_size)
        return max(1, min(budget // self._page_bytes(), most))

    # ----- requests -----------------------------------------------------------------------

    def add_request(
        self, rid: str, prompt_ids: list[int], params: SamplingParams, seed: int | None = None
    ) -> None:
        """Queue a request; raise ValueError if it can never run.

        `seed` is the sampling seed when params has none (a random one if None).
        """
        if not prompt_ids:
            raise ValueError("prompt: must contain at least one token")
        if any(not 0 <= t < self.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt: token ids must be in [0, {self.vocab_size})")
        params.validate(self.vocab_size)
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt: {len(prompt_ids)} tokens leave no room to generate within the "
                f"context length {self.max_model_len}"
            )
        max_new = min(params.max_new_tokens, self.max_model_len - len(prompt_ids))
        if self._pages_for(len(prompt_ids) + max_new) > self.allocator.num_pages:
            raise ValueError(
                f"prompt: {len(prompt_ids)} tokens + max_new_tokens {max_new} exceed the KV "
                f"cache ({self.allocator.num_pages * self.page_size} tokens)"
            )
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.eos_ids
        if seed is None:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
        req = Req(rid, list(prompt_ids), params, seed, frozenset(stop_ids), max_new)
        self.waiting.append(req)
        self._record("add", rid, req.prompt_ids, params, seed)

    def abort(self, rid: str) -> bool:
        """Drop a request wherever it is (queued, retracted, prefilling, decoding)."""
        self._record("abort", rid)
        for req in self.waiting:
            if req.rid == rid:
                req.finish_reason = "abort"  # a step in flight drops its token
                self.waiting.remove(req)
                return True
        for req in self.running:
            if req.rid == rid:
                req.finish_reason = "abort"
                self._release(req, cache_it=False)
                self.running.remove(req)
                return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._in_flight)

    # ----- tensor parallelism -------------------------------------------------------------

    @property
    def _leads_others(self) -> bool:
        """This is rank 0 of several: other ranks replay its calls."""
        return self.tp.size > 1 and self.tp.is_leader

    def _record(self, *op: Any) -> None:
        """Leader: remember a state-changing call for the other ranks (sent with the next step)."""
        if self._leads_others:
            self._ops.append(op)

    def follow(self) -> None:
        """Other ranks: replay the leader's calls and step with it, until it says stop."""
        assert not self.tp.is_leader
        while True:
            ops, theirs = self.tp.broadcast_object(None)
            for op in ops:
                if op[0] == "stop":
                    return
                if op[0] == "add":
                    self.add_request(*op[1:])
                elif op[0] == "abort":
                    self.abort(op[1])
                elif op[0] == "release_cache":
                    self.release_all_cache()
            mine = self._fingerprint()
            if mine != theirs:  # a bug: fail loudly rather than compute garbage
                raise RuntimeError(
                    f"tensor-parallel rank {self.tp.rank} is out of step with rank 0: "
                    f"(steps, waiting, running, free pages, tokens) {mine} != {theirs}"
                )
            self.step()

    def _fingerprint(self) -> tuple[int, ...]:
        """What every rank must agree on before a step (tokens: a hash of all read back)."""
        return (
            self._steps,
            len(self.waiting),
            len(self.running),
            self.allocator.num_free,
            self._token_digest,
        )

    def stop_followers(self) -> None:
        """Leader: let the other ranks' `follow` return (the engine is shutting down)."""
        if self._leads_others:
            self.tp.broadcast_object(([("stop",)], self._fingerprint()))

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            waiting=len(self.waiting),
            running=len(self.running),
            free_pages=self.allocator.num_free,
            cached_pages=self.cache.cached_pages if self.cache else 0,
            total_pages=self.allocator.num_pages,
            prompt_tokens=self._prompt_tokens,
            cached_tokens=self._cached_tokens,
            computed_tokens=self._computed_tokens,
            retractions=self._retractions,
        )

    def check_invariants(self) -> None:
        """Raise AssertionError if pages, rows, locks or the tree are inconsistent."""
        private = sum(len(r.pages) - r.shared_pages for r in self.running)
        cached = 0
        if self.cache is not None:
            self.cache.check()
            cached = self.cache.cached_pages
        if self.allocator.num_free + cached + private != self.allocator.num_pages:
            raise AssertionError(
                f"KV pages leaked: free {self.allocator.num_free} + cached {cached} + "
                f"in use {private} != total {self.allocator.num_pages}"
            )
        self.allocator.check(self.allocator.num_pages - self.allocator.num_free)
        rows = [r.row for r in self.running]
        if len(set(rows)) != len(rows) or set(rows) & set(self.free_rows):
            raise AssertionError("page-table rows double-booked")
        if len(rows) + len(self.free_rows) != self.cfg.max_running_requests:
            raise AssertionError("page-table rows leaked")
        if any(r.pages or r.node is not None for r in self.waiting):
            raise AssertionError("a waiting request holds pages")

    def release_all_cache(self) -> None:
        """Evict every unlocked radix entry (tests use this to see the pool full again)."""
        self._record("release_cache")
        if self.cache is not None:
            self.cache.reset()

    # ----- one step -----------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """Launch the next batch; return the tokens of the step that completed.

        Without overlap that is this step; with it, the previous one (so the GPU already has
        this step queued while the host reads back and post-processes the last).
        """
        if self._leads_others:
            self.tp.broadcast_object((self._ops, self._fingerprint()))
            self._ops = []
        launched = self._launch()
        if not self.overlap:
            return self._complete(launched) if launched else []
        done, self._in_flight = self._in_flight, launched
        return self._complete(done) if done else []

    def _launch(self) -> _Launched | None:
        """Plan a batch, queue its forward and sampling, and advance the requests in it."""
        plan = self._schedule()
        if not plan:
            return None
        self._flush_table_writes()
        device = self.runner.device
        batch = build_forward_batch(
            plan, self.page_table, self.pool, self.runner.attn, self.h2d, self.future
        )
        logits = self.runner.forward(batch)
        reqs = [r for r, _ in plan]
        sampled = self.runner.sample(
            logits, build_sampling_batch(reqs, self.vocab_size, device, self.h2d, self.future)
        )
        base = (self._steps % 2) * self.cfg.max_running_requests
        self._steps += 1
        if self.future is not None:
            self.future[base : base + len(plan)] = sampled.token_ids
        ready = None
        sampled = SampleOutput(
            to_host(sampled.token_ids),
            *(
                None if t is None else to_host(t)
                for t in (sampled.logprobs, sampled.top_ids, sampled.top_logprobs)
            ),
        )
        if device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        out_index: list[int] = []
        for i, (req, n) in enumerate(plan):
            was_prefill = n > 1 or not req.is_decoding
            req.num_computed += n
            if was_prefill and self.cache is not None:
                self._cache_prefix(req)
            if req.num_computed < req.seq_len:
                out_index.append(-1)  # a prefill chunk that is not the prompt's last
            else:
                out_index.append(len(req.output_ids))
                req.output_ids.append(-1 - (base + i))
        self._computed_tokens += sum(n for _, n in plan)
        return _Launched(plan, out_index, sampled, ready)

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def _available_pages(self) -> int:
        evictable = self.cache.evictable_pages if self.cache is not None else 0
        return self.allocator.num_free + evictable

    def _alloc(self, req: Req, n: int) -> None:
        """Give `req` n more pages, evicting cached ones if needed (caller checked availability)."""
        if n <= 0:
            return
        short = n - self.allocator.num_free
        if short > 0 and self.cache is not None:
            self.cache.evict(short)
        pages = self.allocator.alloc(n)
        start = len(req.pages)
        self._table_writes.update(((req.row, start + i), p) for i, p in enumerate(pages))
        req.pages += pages

    def _flush_table_writes(self) -> None:
        if not self._table_writes:
            return
        n = len(self._table_writes)
        rows, cols = zip(*self._table_writes, strict=True)
        pages = self._table_writes.values()
        packed = self.h2d([*rows, *cols, *pages], torch.int64, self.page_table.device)
        self.page_table[packed[:n], packed[n : 2 * n]] = packed[2 * n :].to(torch.int32)
        self._table_writes.clear()

    def _schedule(self) -> list[tuple[Req, int]]:
        """Pick (request, number of new tokens) pairs for this step."""
        retractions = self._retractions
        decodes = self._plan_decodes()
        plan = [(r, 1) for r in decodes]
        budget = self.cfg.chunked_prefill_size
        for req in self.running:
            remaining = req.seq_len - req.num_computed
            if remaining > 1 and budget > 0:
                n = min(remaining, budget)
                plan.append((req, n))
                budget -= n
        if budget > 0 and self._retractions == retractions:  # none while short of pages
            plan += self._admit(budget)
        self.new_token_ratio = max(
            MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY
        )
        return plan

    def _plan_decodes(self) -> list[Req]:
        """Decoding requests, with a page for each token; retracts the newest if pages run out."""
        ps = self.page_size
        while True:
            decodes: list[Req] = []
            need: list[Req] = []
            for r in self.running:
                seq_len = len(r.prompt_ids) + len(r.output_ids)
                # Requests whose last token is in flight wait for it to be read back.
                if r.num_computed == seq_len - 1 and self._may_continue(r):
                    decodes.append(r)
                    if seq_len > len(r.pages) * ps:
                        need.append(r)
            if len(need) <= self._available_pages():
                break
            self._retract(self.running[-1])
        if need:
            short = len(need) - self.allocator.num_free
            if short > 0 and self.cache is not None:
                self.cache.evict(short)
            for req, page in zip(need, self.allocator.alloc(len(need)), strict=True):
                self._table_writes[req.row, len(req.pages)] = page
                req.pages.append(page)
        return decodes

    def _retract(self, req: Req) -> None:
        """Send a running request back to the front of the queue, keeping what the cache can."""
        self._release(req, cache_it=True)
        self.running.remove(req)
        req.num_computed = 0
        self.waiting.appendleft(req)
        self._retractions += 1
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
        log.debug("retracted %s (%d tokens)", req.rid, req.seq_len)

    def _ordered_waiting(self) -> list[Req]:
        """Waiting requests in admission order (LPM: longest cached prefix first, stable)."""
        queue = list(self.waiting)
        cache = self.cache
        if self.cfg.schedule_policy == "lpm" and cache is not None and len(queue) <= LPM_MAX_QUEUE:
            queue.sort(key=lambda r: -cache.match_len(r.token_slice(0, r.seq_len - 1)))
        return queue

    def _admit(self, budget: int) -> list[tuple[Req, int]]:
        """Admit waiting requests while rows, pages and the token budget allow."""
        plan: list[tuple[Req, int]] = []
        # Pages the running requests are expected to need for their remaining tokens.
        growth = sum(r.remaining_new_tokens for r in self.running)
        reserve = math.ceil(self.new_token_ratio * growth / self.page_size)
        for req in self._ordered_waiting():
            if budget <= 0 or not self.free_rows:
                break
            ids = req.token_slice(0, req.seq_len)
            prefix_pages: list[int] = []
            node = None
            if self.cache is not None:
                prefix_pages, node = self.cache.match(ids[:-1])
                self.cache.lock(node)  # before counting what is evictable
            new_pages = self._pages_for(len(ids)) - len(prefix_pages)
            future = math.ceil(self.new_token_ratio * req.remaining_new_tokens / self.page_size)
            if self._available_pages() - reserve < new_pages + future:
                if self.cache is not None and node is not None:
                    self.cache.unlock(node)
                break
            self.waiting.remove(req)
            req.row = self.free_rows.pop()
            req.pages, req.shared_pages, req.node = list(prefix_pages), len(prefix_pages), node
            self._table_writes.update(((req.row, i), p) for i, p in enumerate(prefix_pages))
            req.num_computed = len(prefix_pages) * self.page_size
            if req.cached_tokens < 0:
                req.cached_tokens = req.num_computed
                self._prompt_tokens += len(req.prompt_ids)
                self._cached_tokens += req.num_computed
            self._alloc(req, new_pages)
            self.running.append(req)
            reserve += future
            n = min(len(ids) - req.num_computed, budget)
            plan.append((req, n))
            budget -= n
        return plan

    def _may_continue(self, req: Req) -> bool:
        """Whether another token may follow the (possibly unread) tokens the request has."""
        return req.remaining_new_tokens > 0 and req.seq_len < self.max_model_len

    def _complete(self, launched: _Launched) -> list[TokenEvent]:
        """Read back a launched step's tokens, check stop conditions, finish requests."""
        if launched.ready is not None:
            launched.ready.synchronize()
        out = launched.sampled
        ids = out.token_ids.tolist()
        self._token_digest = hash((self._token_digest, *ids))
        lps = out.logprobs.tolist() if out.logprobs is not None else None
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        events: list[TokenEvent] = []
        for i, (req, _) in enumerate(launched.plan):
            idx = launched.out_index[i]
            if idx < 0 or req.finish_reason is not None:
                continue  # no token, or the request ended (stopped or aborted) meanwhile
            token = ids[i]
            req.output_ids[idx] = token
            logprob = top = None
            if req.params.logprobs and lps is not None:
                logprob = lps[i]
                req.logprobs.append(logprob)
            if req.params.top_logprobs and top_ids is not None and top_lps is not None:
                k = req.params.top_logprobs
                top = list(zip(top_ids[i][:k], top_lps[i][:k], strict=True))
                req.top_logprobs.append(top)
            if token in req.stop_ids and idx + 1 >= req.params.min_new_tokens:
                req.finish_reason, req.matched_stop = "stop", token
            elif idx + 1 >= req.max_new_tokens or req.resolved_len >= self.max_model_len:
                req.finish_reason = "length"
            events.append(
                TokenEvent(
                    req.rid,
                    token,
                    logprob,
                    top,
                    req.finish_reason,
                    req.matched_stop,
                    len(req.prompt_ids),
                    req.cached_tokens,
                )
            )
            if req.finish_reason is not None:
                self._retire(req)
        return events

    def _retire(self, req: Req) -> None:
        """Take a finished request out of the running batch (or the queue, if retracted)."""
        if req.row >= 0:
            self._release(req, cache_it=True)
            self.running.remove(req)
        else:
            self.waiting.remove(req)

    def _cache_prefix(self, req: Req) -> None:
        """Put the request's computed full pages into the radix tree and lock them for it."""
        assert self.cache is not None
        full = min(req.num_computed, req.resolved_len) // self.page_size
        if full <= req.shared_pages:
            return
        tree_pages, node = self.cache.insert(
            req.token_slice(0, full * self.page_size), req.pages[:full]
        )
        for i, (mine, theirs) in enumerate(zip(req.pages[:full], tree_pages, strict=True)):
            if mine != theirs:  # someone cached this part first: use theirs (ours were freed)
                req.pages[i] = theirs
                self._table_writes[req.row, i] = theirs
        self.cache.lock(node)
        if req.node is not None:
            self.cache.unlock(req.node)
        req.node, req.shared_pages = node, full

    def _release(self, req: Req, cache_it: bool) -> None:
        """Give back the request's pages and row; with cache_it, computed pages go to the tree."""
        if self.cache is not None and cache_it:
            self._cache_prefix(req)
        if self.cache is not None and req.node is not None:
            self.cache.unlock(req.node)
        self.allocator.free(req.pages[req.shared_pages :])
        req.pages, req.shared_pages, req.node = [], 0, None
        self.free_rows.append(req.row)
        req.row = -1
