"""Continuous batching: requests join and leave the running batch at every step.

Each step the scheduler picks tokens to compute: one for every decoding request, then
prompt tokens of prefilling requests up to the chunked-prefill budget (so prefill and
decode share forwards), admits waiting requests FCFS while KV pages and rows allow,
runs the model, samples, and reports a TokenEvent per request that produced a token.
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from dataclasses import dataclass

import torch

from minisgl.attention.base import ForwardBatch
from minisgl.config import EngineConfig
from minisgl.engine.model_runner import ModelRunner
from minisgl.engine.sampler import Penalties, SamplingBatch
from minisgl.kvcache.allocator import PageAllocator
from minisgl.kvcache.pool import KVPool
from minisgl.sampling_params import SamplingParams
from minisgl.scheduler.request import Req, TokenEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerStats:
    """Counters for load reporting."""

    waiting: int
    running: int
    free_pages: int
    total_pages: int


class Scheduler:
    """Owns the queues, the KV pool and its pages; drives the ModelRunner step by step."""

    def __init__(self, cfg: EngineConfig, runner: ModelRunner, max_model_len: int) -> None:
        self.cfg = cfg
        self.runner = runner
        self.max_model_len = max_model_len
        mc = runner.model_config
        self.vocab_size = mc.vocab_size
        self.eos_ids = frozenset(mc.eos_token_ids)
        self.page_size = cfg.page_size
        num_pages = cfg.num_pages or self._auto_num_pages()
        self.pool = KVPool(
            mc.num_layers,
            num_pages,
            cfg.page_size,
            mc.num_kv_heads,
            mc.head_dim,
            runner.dtype,
            runner.device,
        )
        self.allocator = PageAllocator(num_pages)
        self.max_pages_per_req = -(-max_model_len // cfg.page_size)
        self.page_table = torch.zeros(
            cfg.max_running_requests,
            self.max_pages_per_req,
            dtype=torch.int32,
            device=runner.device,
        )
        self.free_rows = list(range(cfg.max_running_requests - 1, -1, -1))
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.reserved_pages = 0
        log.info(
            "KV cache: %d pages x %d tokens (%.2f GiB)",
            num_pages,
            cfg.page_size,
            num_pages * self._page_bytes() / 2**30,
        )

    # ----- sizing -------------------------------------------------------------------------

    def _page_bytes(self) -> int:
        mc = self.runner.model_config
        return KVPool.bytes_per_page(
            mc.num_layers, self.page_size, mc.num_kv_heads, mc.head_dim, self.runner.dtype
        )

    def _auto_num_pages(self) -> int:
        device = self.runner.device
        if device.type == "cuda":
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

    def add_request(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; raise ValueError if it can never run."""
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
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        req = Req(rid, list(prompt_ids), params, seed, frozenset(stop_ids), max_new)
        self.waiting.append(req)

    def abort(self, rid: str) -> bool:
        """Drop a request wherever it is, releasing its pages; False if unknown."""
        for req in self.waiting:
            if req.rid == rid:
                self.waiting.remove(req)
                return True
        for req in self.running:
            if req.rid == rid:
                self._release(req)
                self.running.remove(req)
                return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            len(self.waiting), len(self.running), self.allocator.num_free, self.allocator.num_pages
        )

    def check_invariants(self) -> None:
        """Raise AssertionError if pages, rows or reservations are inconsistent."""
        self.allocator.check(sum(len(r.pages) for r in self.running))
        rows = [r.row for r in self.running]
        if len(set(rows)) != len(rows) or set(rows) & set(self.free_rows):
            raise AssertionError("page-table rows double-booked")
        if len(rows) + len(self.free_rows) != self.cfg.max_running_requests:
            raise AssertionError("page-table rows leaked")
        if self.reserved_pages != sum(r.reserved_pages for r in self.running):
            raise AssertionError("page reservations out of sync")
        if self.reserved_pages > self.allocator.num_free:
            raise AssertionError("more pages reserved than free")

    # ----- one step -----------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """Run one forward over the next batch; return the tokens it produced."""
        plan = self._schedule()
        if not plan:
            return []
        batch = self._build_batch(plan)
        logits = self.runner.forward(batch)
        sampled = self.runner.sample(logits, self._sampling_batch([r for r, _ in plan]))
        return self._process(plan, sampled)

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def _schedule(self) -> list[tuple[Req, int]]:
        """Pick (request, number of new tokens) pairs for this step."""
        plan: list[tuple[Req, int]] = []
        budget = self.cfg.chunked_prefill_size
        # Decodes first: each needs one token and never waits behind a prefill.
        for req in self.running:
            if req.num_computed == req.seq_len - 1:
                plan.append((req, 1))
                budget -= 1
        for req in self.running:
            remaining = req.seq_len - req.num_computed
            if remaining > 1 and budget > 0:
                n = min(remaining, budget)
                plan.append((req, n))
                budget -= n
        while self.waiting and budget > 0 and self.free_rows:
            req = self.waiting[0]
            need = self._pages_for(len(req.prompt_ids) + req.max_new_tokens)
            if self.allocator.num_free - self.reserved_pages < need:
                break
            self.waiting.popleft()
            req.row = self.free_rows.pop()
            req.reserved_pages = need
            self.reserved_pages += need
            self.running.append(req)
            n = min(req.seq_len, budget)
            plan.append((req, n))
            budget -= n
        return plan

    def _build_batch(self, plan: list[tuple[Req, int]]) -> ForwardBatch:
        ps = self.page_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        new_rows: list[int] = []
        new_cols: list[int] = []
        new_pages: list[int] = []
        for req, n in plan:
            start, end = req.num_computed, req.num_computed + n
            grow = self._pages_for(end) - len(req.pages)
            if grow > 0:
                pages = self.allocator.alloc(grow)
                new_rows += [req.row] * grow
                new_cols += range(len(req.pages), len(req.pages) + grow)
                new_pages += pages
                req.pages += pages
                req.reserved_pages -= grow
                self.reserved_pages -= grow
            input_ids += req.token_slice(start, end)
            positions += range(start, end)
            slots += [req.pages[p // ps] * ps + p % ps for p in range(start, end)]
        device = self.runner.device
        if new_pages:
            self.page_table[
                torch.tensor(new_rows, device=device), torch.tensor(new_cols, device=device)
            ] = torch.tensor(new_pages, dtype=torch.int32, device=device)
        seq_lens = [req.num_computed + n for req, n in plan]
        ext = [n for _, n in plan]

        def tensor(values: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        return ForwardBatch(
            input_ids=tensor(input_ids),
            positions=tensor(positions),
            out_slots=tensor(slots),
            req_rows=tensor([req.row for req, _ in plan]),
            page_table=self.page_table,
            seq_lens=tensor(seq_lens, torch.int32),
            extend_lens=tensor(ext, torch.int32),
            seq_lens_cpu=seq_lens,
            extend_lens_cpu=ext,
            page_size=ps,
            k_caches=self.pool.k_caches,
            v_caches=self.pool.v_caches,
            attn=self.runner.attn,
        )

    def _sampling_batch(self, reqs: list[Req]) -> SamplingBatch:
        device = self.runner.device
        vocab = self.vocab_size
        params = [r.params for r in reqs]

        def floats(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)

        def ints(values: list[int] | list[list[int]]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)

        def padded(rows: list[list[int]]) -> torch.Tensor:
            width = max(1, max(len(r) for r in rows))
            return ints([r + [vocab] * (width - len(r)) for r in rows])

        penalties = None
        if any(
            p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params
        ):
            penalties = Penalties(
                repetition=floats([p.repetition_penalty for p in params]),
                presence=floats([p.presence_penalty for p in params]),
                frequency=floats([p.frequency_penalty for p in params]),
                seen_ids=padded([r.prompt_ids + r.output_ids for r in reqs]),
                output_ids=padded([r.output_ids for r in reqs]),
            )
        banned = None
        if any(len(r.output_ids) < r.params.min_new_tokens and r.stop_ids for r in reqs):
            banned = padded(
                [
                    sorted(r.stop_ids) if len(r.output_ids) < r.params.min_new_tokens else []
                    for r in reqs
                ]
            )
        return SamplingBatch(
            temperature=floats([p.temperature for p in params]),
            top_k=ints([p.top_k if p.top_k > 0 else vocab for p in params]),
            top_p=floats([p.top_p for p in params]),
            min_p=floats([p.min_p for p in params]),
            seeds=ints([r.seed for r in reqs]),
            steps=ints([len(r.output_ids) for r in reqs]),
            all_greedy=all(p.greedy for p in params),
            use_top_k=any(0 < p.top_k < vocab and not p.greedy for p in params),
            use_top_p=any(p.top_p < 1.0 and not p.greedy for p in params),
            use_min_p=any(p.min_p > 0.0 and not p.greedy for p in params),
            penalties=penalties,
            banned_ids=banned,
            want_logprobs=any(p.logprobs for p in params),
            top_logprobs=max(p.top_logprobs for p in params),
        )

    def _process(self, plan: list[tuple[Req, int]], sampled: object) -> list[TokenEvent]:
        from minisgl.engine.sampler import SampleOutput

        assert isinstance(sampled, SampleOutput)
        ids = sampled.token_ids.tolist()
        lps = sampled.logprobs.tolist() if sampled.logprobs is not None else None
        top_ids = sampled.top_ids.tolist() if sampled.top_ids is not None else None
        top_lps = sampled.top_logprobs.tolist() if sampled.top_logprobs is not None else None
        events: list[TokenEvent] = []
        for i, (req, n) in enumerate(plan):
            req.num_computed += n
            if req.num_computed < req.seq_len:
                continue  # a prefill chunk that is not the prompt's last
            token = ids[i]
            req.output_ids.append(token)
            logprob = top = None
            if req.params.logprobs and lps is not None:
                logprob = lps[i]
                req.logprobs.append(logprob)
            if req.params.top_logprobs and top_ids is not None and top_lps is not None:
                k = req.params.top_logprobs
                top = list(zip(top_ids[i][:k], top_lps[i][:k], strict=True))
                req.top_logprobs.append(top)
            if token in req.stop_ids and len(req.output_ids) >= req.params.min_new_tokens:
                req.finish_reason, req.matched_stop = "stop", token
            elif len(req.output_ids) >= req.max_new_tokens or req.seq_len >= self.max_model_len:
                req.finish_reason = "length"
            events.append(
                TokenEvent(req.rid, token, logprob, top, req.finish_reason, req.matched_stop)
            )
        finished = [r for r, _ in plan if r.finish_reason is not None]
        for req in finished:
            self._release(req)
            self.running.remove(req)
        return events

    def _release(self, req: Req) -> None:
        self.allocator.free(req.pages)
        req.pages = []
        self.reserved_pages -= req.reserved_pages
        req.reserved_pages = 0
        self.free_rows.append(req.row)
        req.row = -1
