"""Turn the scheduler's plan, (request, new tokens) pairs, into the engine's plain StepPlan, and
fill a planned step's structured-output bitmask."""

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
) -> StepPlan:
    """The StepPlan computing `n` new tokens of each (req, n); pages must be assigned.

    Token ids not yet read back from the device are placeholders (see Scheduler: overlap
    scheduling), which the engine resolves. The structured-output bitmask is not part of it
    (see `row_matchers`).
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
        sampling=build_sampling_plan([r for r, _ in plan], vocab),
    )


def row_matchers(plan: list[tuple[Req, int]]) -> list[Any]:
    """Per row of a plan (before the requests advance): the grammar matcher whose bitmask
    constrains the token it samples, None for rows without a constraint and for prefill chunks
    before the prompt's last (their token is not kept)."""
    return [r.matcher if r.num_computed + n >= r.seq_len else None for r, n in plan]


def step_bitmask(
    plan: list[tuple[Req, int]],
    matchers: list[Any],
    vocab: int,
    batch_matcher: Any = None,
    pin: bool = False,
) -> Any:
    """The host bitmask of a planned step from its rows' matchers as they are now (see
    `grammar.fill_bitmask`, also for `pin`; None without constrained rows). A row whose request
    has finished or was aborted since it was planned gets every token (its token is dropped).
    `batch_matcher` (an xgrammar BatchGrammarMatcher) fills rows on several threads."""
    live = [
        m if m is not None and req.finish_reason is None else None
        for m, (req, _) in zip(matchers, plan, strict=True)
    ]
    return fill_bitmask(live, vocab, batch_matcher, pin)


def build_sampling_plan(reqs: list[Req], vocab: int) -> SamplingPlan:
    """Per-row sampling options; penalty and ban lists only when some request needs them."""
    params = [r.params for r in reqs]
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
    )
