"""Continuous batching with a prefix cache, chunked prefill and retraction.

Each step (`step`) is schedule, run, postprocess:
1. `BatchPlanner.plan` (scheduler/planner.py) picks (request, new tokens) pairs: decodes,
   prefill chunks, admissions; it owns the waiting queue and the running batch and retracts
   the newest requests when the pool is short of pages.
2. `_launch` hands the plan to the ModelRunner, which owns every device tensor, as a plain
   StepPlan; the forward and sampling are queued on the device (for a step with constrained
   rows the sampling later, by `_launch_sample`, with their structured-output bitmask).
3. `_complete` (`postprocess.complete`) reads a launched step's tokens back, checks stop
   conditions and reports a TokenOut (the wire struct, `ipc.messages`) for each request that
   produced a token; a request's first one carries its params, for the detokenizer.

Pages and page-table rows are managed by `KVPages` (scheduler/pages.py), with the prefix cache
behind it; the tensor-parallel protocol is `TPSync` (scheduler/tp_sync.py).

Overlap scheduling: a step only launches its forward and sampling on the GPU, advances each
request as if its token were known (the token id is a placeholder, -1 - slot, for the slot of
the runner's `future` the sampled id is written to on the device), and reads back the tokens
of the step before, which ran while the CPU was planning this one (with constrained rows the
read-back comes between the forward and the sampling: see below). The next step's input ids
are resolved from `future` on the GPU, so the CPU never waits for a step to end before
planning the next. A request that stops at a token the CPU has not seen yet is already in the
next step; that one extra token is dropped. Without overlap, each step reads back its own
tokens at once, through the same code (with no step before to read back).

Structured output: a request with a constraint gets an xgrammar matcher (`grammar.py`; its
grammar compiled once per distinct constraint in this process, cached); the matcher accepts
each token as it is read back. A step with constrained rows is launched in the order SGLang
uses: (1) its forward, which needs no mask (its input ids come from `future`), constrained
rows included; (2) the step before is completed while the GPU runs that forward (read back,
matchers advanced, stop checks, finished requests retired); (3) the constrained rows' bitmask
is filled on the host from the advanced matchers (every token allowed in a row whose request
finished or was aborted meanwhile: its token is dropped) and the sampling is launched.
Invariant: when the sampling of a step with constrained rows is launched, every step before
it has been completed, so every matcher has accepted every earlier token. A step without
constrained rows needs no mask and launches its sampling right behind its forward, before
(2). So constrained requests decode on every step, like the others.

Tensor parallelism: every rank runs its own Scheduler over its shard of the model and KV
cache. Only the leader (rank 0) is called from outside; it records each call that changes the
state and, at the start of every step, broadcasts them to the other ranks, which replay them
and step too (`follow`). Scheduling is deterministic given those calls and the sampled tokens,
and every rank samples the same tokens from the same gathered logits, so all ranks make the
same decisions without further messages (whether a step's sampling waits for the step before
depends on its plan alone, so every rank splits the same steps).
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from dataclasses import dataclass
from typing import Any

from minisgl.config import EngineConfig
from minisgl.engine.model_runner import ModelRunner
from minisgl.grammar import GrammarCompiler, GrammarSource
from minisgl.ipc.messages import TokenOut
from minisgl.kvcache.allocator import PageAllocator
from minisgl.kvcache.prefix import PrefixCache
from minisgl.models.source import resolve_model
from minisgl.sampling_params import SamplingParams
from minisgl.scheduler.batch import build_step_plan, row_matchers, step_bitmask
from minisgl.scheduler.pages import KVPages
from minisgl.scheduler.planner import BatchPlanner
from minisgl.scheduler.policy import AdmissionPolicy
from minisgl.scheduler.postprocess import Forwarded, Launched, complete
from minisgl.scheduler.request import Req
from minisgl.scheduler.tp_sync import AbortOp, AddOp, Fingerprint, ReleaseCacheOp, TPSync
from minisgl.tokenizer.tokenizer import Tokenizer, tokenizer_for

log = logging.getLogger(__name__)


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


class Scheduler:
    """Owns the queues and the requests' pages; hands the ModelRunner one plan per step."""

    def __init__(self, cfg: EngineConfig, runner: ModelRunner, max_model_len: int) -> None:
        self.cfg = cfg
        self.runner = runner
        self.max_model_len = max_model_len
        mc = runner.model_config
        self.vocab_size = mc.vocab_size
        self.eos_ids = frozenset(mc.eos_token_ids)
        self.page_size = cfg.page_size
        self.tp = runner.tp
        self.sync = TPSync(self.tp)
        num_pages = runner.num_pages  # the runner's KV pool, built by `allocate_kv`
        self.kv = KVPages(
            num_pages, cfg.page_size, cfg.max_running_requests, not cfg.disable_radix_cache
        )
        policy = AdmissionPolicy(cfg.schedule_policy, cfg.page_size)
        self.planner = BatchPlanner(self.kv, policy, cfg.chunked_prefill_size, max_model_len)
        self.overlap = runner.overlap
        self._steps = 0
        self._token_digest = 0  # hash of every token read back (ranks compare it)
        self._in_flight: Launched | None = None
        self._pin = runner.device.type == "cuda"  # bitmasks in pinned memory, for the copy
        self._computed_tokens = 0
        self.grammar_source = GrammarSource(
            self._load_tokenizer, self.vocab_size, sorted(self.eos_ids)
        )
        log.info(
            "KV cache: %d pages x %d tokens = %d tokens (%.2f GiB), radix cache %s, policy %s, "
            "overlap scheduling %s",
            num_pages,
            cfg.page_size,
            num_pages * cfg.page_size,
            num_pages * runner.page_bytes() / 2**30,
            "on" if self.cache.keeps_pages else "off",
            cfg.schedule_policy,
            "on" if self.overlap else "off",
        )

    @property
    def allocator(self) -> PageAllocator:
        return self.kv.allocator

    @property
    def cache(self) -> PrefixCache:
        return self.kv.cache

    @property
    def waiting(self) -> deque[Req]:
        return self.planner.waiting

    @property
    def running(self) -> list[Req]:
        return self.planner.running

    # ----- requests -----------------------------------------------------------------------

    def add_request(
        self, rid: str, prompt_ids: list[int], params: SamplingParams, seed: int | None = None
    ) -> None:
        """Queue a request; raise ValueError if the KV cache can never hold it.

        The prompt and the params are validated before they get here (`check_prompt` and
        `SamplingParams.validate`, by the tokenizer worker or `LLM.submit`); only the pool's
        size is known here alone. A constraint is compiled here (from this process's cache
        when seen before); one that does not compile raises ValueError naming its field.
        `seed` is the sampling seed when params has none (a random one if None).
        """
        assert prompt_ids and len(prompt_ids) < self.max_model_len, "validated by check_prompt"
        assert min(prompt_ids) >= 0 and max(prompt_ids) < self.vocab_size, "validated"
        max_new = min(params.max_new_tokens, self.max_model_len - len(prompt_ids))
        if self.kv.pages_for(len(prompt_ids) + max_new) > self.allocator.num_pages:
            raise ValueError(
                f"prompt: {len(prompt_ids)} tokens + max_new_tokens {max_new} exceed the KV "
                f"cache ({self.allocator.num_pages * self.page_size} tokens)"
            )
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.eos_ids
        if seed is None:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
        matcher = self.grammars.matcher(params) if params.constraint is not None else None
        req = Req(rid, list(prompt_ids), params, seed, frozenset(stop_ids), max_new)
        req.matcher = matcher
        self.waiting.append(req)
        self.sync.record(AddOp(rid, req.prompt_ids, params, seed))

    @property
    def grammars(self) -> GrammarCompiler:
        """The compiler of structured-output constraints (loaded here on first use, unless
        `grammar_source.prepare()` or `use_tokenizer` came first)."""
        return self.grammar_source.compiler

    def use_tokenizer(self, tokenizer: Tokenizer | None) -> None:
        """Compile constraints with this (already loaded) tokenizer."""
        self.grammar_source.use_tokenizer(tokenizer)

    def _load_tokenizer(self) -> Tokenizer | None:
        cfg = self.cfg
        return tokenizer_for(
            resolve_model(cfg.model, cfg.dummy_weights, cfg.revision), cfg.tokenizer
        )

    def abort(self, rid: str) -> bool:
        """Drop a request wherever it is (queued, retracted, prefilling, decoding)."""
        self.sync.record(AbortOp(rid))
        for req in self.waiting:
            if req.rid == rid:
                req.finish_reason = "abort"  # a step in flight drops its token
                self.waiting.remove(req)
                return True
        for req in self.running:
            if req.rid == rid:
                req.finish_reason = "abort"
                self.kv.release(req, cache_it=False)
                self.running.remove(req)
                return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._in_flight)

    def release_all_cache(self) -> None:
        """Evict every unlocked prefix-cache entry (tests use this to see the pool full again)."""
        self.sync.record(ReleaseCacheOp())
        self.cache.reset()

    # ----- tensor parallelism -------------------------------------------------------------

    def fingerprint(self) -> Fingerprint:
        """What every rank must agree on before a step."""
        return Fingerprint(
            self._steps,
            len(self.waiting),
            len(self.running),
            self.allocator.num_free,
            self._token_digest,
        )

    def follow(self) -> None:
        """Other ranks: replay the leader's calls and step with it, until it says stop."""
        self.sync.follow(self)

    def stop_followers(self) -> None:
        """Leader: let the other ranks' `follow` return (the engine is shutting down)."""
        self.sync.stop_followers(self.fingerprint())

    # ----- statistics and invariants ------------------------------------------------------

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            waiting=len(self.waiting),
            running=len(self.running),
            free_pages=self.allocator.num_free,
            cached_pages=self.cache.cached_pages,
            total_pages=self.allocator.num_pages,
            prompt_tokens=self.planner.prompt_tokens,
            cached_tokens=self.planner.cached_tokens,
            computed_tokens=self._computed_tokens,
            retractions=self.planner.retractions,
        )

    def reset_counters(self) -> None:
        """Zero the cumulative counters of `stats()` (after a warm-up, which is no request)."""
        self.planner.prompt_tokens = self.planner.cached_tokens = self.planner.retractions = 0
        self._computed_tokens = 0

    def check_invariants(self) -> None:
        """Raise AssertionError if pages, rows, locks or the prefix cache are inconsistent."""
        self.kv.check(self.running, self.waiting)

    # ----- one step: schedule, run, postprocess -------------------------------------------

    def step(self) -> list[TokenOut]:
        """Launch the next batch; return the tokens of the step that completed.

        Without overlap that is this step; with it, the previous one (so the GPU already has
        this step's forward queued while the host reads back and post-processes the last).
        """
        self.sync.send(self.fingerprint())
        launched = self._launch()
        done, self._in_flight = self._in_flight, None
        outputs = self._complete(done) if done else []
        if isinstance(launched, Forwarded):  # every matcher has its tokens now: sample
            launched = self._launch_sample(launched)
        if launched is None:
            return outputs
        if not self.overlap:
            return self._complete(launched)
        self._in_flight = launched
        return outputs

    def _launch(self) -> Launched | Forwarded | None:
        """Queue the next step on the runner: its forward, and its sampling too unless it has
        constrained rows (Forwarded then: `_launch_sample` once the step before is completed)."""
        fwd = self._forward()
        if fwd is None or fwd.constrained:
            return fwd
        return self._launch_sample(fwd)

    def _forward(self) -> Forwarded | None:
        """Plan a batch, queue its forward on the runner, and advance the requests in it."""
        plan = self.planner.plan()
        if not plan:
            return None
        matchers = row_matchers(plan)
        step_plan = build_step_plan(
            plan, self.page_size, self.vocab_size, self.kv.take_table_writes()
        )
        pending = self.runner.launch_forward(step_plan)
        self._steps += 1
        out_index: list[int] = []
        for i, (req, n) in enumerate(plan):
            was_prefill = n > 1 or not req.is_decoding
            req.num_computed += n
            if was_prefill:
                self.kv.cache_prefix(req)
            if req.num_computed < req.seq_len:
                out_index.append(-1)  # a prefill chunk that is not the prompt's last
            else:
                out_index.append(len(req.output_ids))
                req.output_ids.append(-1 - (pending.first_slot + i))
        self._computed_tokens += sum(n for _, n in plan)
        return Forwarded(plan, out_index, matchers, pending)

    def _launch_sample(self, fwd: Forwarded) -> Launched:
        """Fill the bitmask of a forwarded step's constrained rows from their matchers as
        they are now, and queue its sampling."""
        bitmask = None
        if fwd.constrained:
            bitmask = step_bitmask(
                fwd.plan, fwd.matchers, self.vocab_size, self._batch_matcher(), self._pin
            )
        step = self.runner.launch_sample(fwd.step, bitmask)
        return Launched(fwd.plan, fwd.out_index, step, fwd.constrained)

    def _batch_matcher(self) -> Any:
        """xgrammar's BatchGrammarMatcher, which works on many matchers on its threads (only
        for steps with constrained rows: it imports xgrammar)."""
        grammars = self.grammar_source.loaded
        return grammars.batch if grammars is not None else None

    def _complete(self, launched: Launched) -> list[TokenOut]:
        """Read back a launched step's tokens and take the finished requests out."""
        batch = self._batch_matcher() if launched.constrained else None
        done = complete(launched, self.max_model_len, batch)
        self._token_digest = hash((self._token_digest, *done.token_ids))
        for req in done.finished:
            self._retire(req)
        return done.outputs

    def _retire(self, req: Req) -> None:
        """Take a finished request out of the running batch (or the queue, if retracted)."""
        if req.row >= 0:
            self.kv.release(req, cache_it=True)
            self.running.remove(req)
        else:
            self.waiting.remove(req)
