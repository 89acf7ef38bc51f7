"""Turn the scheduler's plan, (request, new tokens) pairs, into the engine's plain StepPlan."""

from __future__ import annotations

from typing import Any

from minisgl.engine.step import PenaltyPlan, SamplingPlan, StepPlan
from minisgl.grammar import fill_bitmask
from minisgl.scheduler.request import Req


def build_step_plan(
    plan: list[tuple[Req, int]],
    page_size: int,
    vocab: int,
    table_writes: dict[tuple[int, int], int],
    batch_matcher: Any = None,
) -> StepPlan:
    """The StepPlan computing `n` new tokens of each (req, n); pages must be assigned.

    `batch_matcher` (an xgrammar BatchGrammarMatcher) fills the structured-output bitmask
    rows of constrained requests on several threads.

    Token ids not yet read back from the device are placeholders (see Scheduler: overlap
    scheduling), which the engine resolves.
    """
    ps = page_size
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    for req, n in plan:
        start, end = req.num_computed, req.num_computed + n
        input_ids += req.token_slice(start, end)
        positions += range(start, end)
        pages = req.pages
        slots += [pages[p // ps] * ps + p % ps for p in range(start, end)]
    return StepPlan(
        table_writes=table_writes,
        input_ids=input_ids,
        positions=positions,
        out_slots=slots,
        req_rows=[req.row for req, _ in plan],
        seq_lens=[req.num_computed + n for req, n in plan],
        extend_lens=[n for _, n in plan],
        sampling=build_sampling_plan(
            [r for r, _ in plan],
            vocab,
            # Rows that sample a token this step (not a prefill chunk before the prompt's last)
            [r.matcher if r.num_computed + n >= r.seq_len else None for r, n in plan],
            batch_matcher,
        ),
    )


def build_sampling_plan(
    reqs: list[Req], vocab: int, matchers: list[Any] | None = None, batch_matcher: Any = None
) -> SamplingPlan:
    """Per-row sampling options; penalty and ban lists only when some request needs them.

    `matchers`: per row, the grammar matcher whose bitmask constrains its token (None for
    none); the requests' own matchers when not given.
    """
    params = [r.params for r in reqs]
    if matchers is None:
        matchers = [r.matcher for r in reqs]
    penalties = None
    if any(
        p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params
    ):
        penalties = PenaltyPlan(
            repetition=[p.repetition_penalty for p in params],
            presence=[p.presence_penalty for p in params],
            frequency=[p.frequency_penalty for p in params],
            seen_ids=[r.prompt_ids + r.output_ids for r in reqs],
            output_ids=[r.output_ids for r in reqs],
        )
    too_early = [len(r.output_ids) < r.params.min_new_tokens for r in reqs]
    banned = None
    if any(too_early):
        banned = [sorted(r.stop_ids) if t else [] for r, t in zip(reqs, too_early, strict=True)]
    cut = [p for p in params if not p.greedy and (0 < p.top_k < vocab or p.top_p < 1.0)]
    return SamplingPlan(
        temperature=[p.temperature for p in params],
        top_p=[p.top_p for p in params],
        min_p=[p.min_p for p in params],
        top_k=[p.top_k if p.top_k > 0 else vocab for p in params],
        seeds=[r.seed for r in reqs],
        steps=[len(r.output_ids) for r in reqs],
        all_greedy=all(p.greedy for p in params),
        use_top_k=any(0 < p.top_k < vocab and not p.greedy for p in params),
        use_top_p=any(p.top_p < 1.0 and not p.greedy for p in params),
        use_min_p=any(p.min_p > 0.0 and not p.greedy for p in params),
        penalties=penalties,
        banned_ids=banned,
        want_logprobs=any(p.logprobs for p in params),
        top_logprobs=max(p.top_logprobs for p in params),
        max_top_k=max((p.top_k if 0 < p.top_k < vocab else vocab for p in cut), default=0),
        grammar_bitmask=fill_bitmask(matchers, vocab, batch_matcher),
    )
