"""A launched step's postprocessing: its tokens read back, stop conditions, the TokenOuts (and
the scheduler's records of a step in its two halves, forwarded and launched)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from minisgl.engine.step import LaunchedStep, PendingStep
from minisgl.ipc.messages import TokenOut
from minisgl.sampling_params import FinishReason
from minisgl.scheduler.request import Req

log = logging.getLogger(__name__)


@dataclass
class Forwarded:
    """A step whose forward was queued on the device, its sampling not yet."""

    plan: list[tuple[Req, int]]
    out_index: list[int]  # per row: index of its placeholder in req.output_ids, -1 if none
    matchers: list[Any]  # per row: the grammar matcher its token's bitmask comes from, or None
    step: PendingStep

    @property
    def constrained(self) -> bool:
        """Some row's token needs a structured-output bitmask."""
        return any(m is not None for m in self.matchers)


@dataclass
class Launched:
    """A step whose forward and sampling were queued on the device, tokens not yet read."""

    plan: list[tuple[Req, int]]
    out_index: list[int]  # per row: index of its placeholder in req.output_ids, -1 if none
    step: LaunchedStep
    constrained: bool = False  # some row's token was sampled under a structured-output mask


@dataclass
class Completed:
    """What reading a launched step back gave: every row's token id (the ranks hash them),
    one TokenOut per request that produced a token, and the requests that finished."""

    token_ids: list[int]
    outputs: list[TokenOut]
    finished: list[Req]


def complete(launched: Launched, max_model_len: int, batch_matcher: Any = None) -> Completed:
    """Wait for a launched step's tokens, put them in place of their placeholders and finish
    the requests that reached a stop token, the end of their constraint or their length. A
    request that finished or was aborted while the step was in flight gets nothing (its
    token is dropped). `batch_matcher` (an xgrammar BatchGrammarMatcher) feeds the tokens to
    the constrained requests' matchers on several threads."""
    ids, lps, top_ids, top_lps = launched.step.read()
    outputs: list[TokenOut] = []
    finished: list[Req] = []
    accepted = _accept_tokens(launched, ids, batch_matcher)
    for i, (req, _) in enumerate(launched.plan):
        idx = launched.out_index[i]
        if idx < 0 or req.finish_reason is not None:
            continue  # no token, or the request ended (stopped or aborted) meanwhile
        token = ids[i]
        req.output_ids[idx] = token
        logprob = lps[i] if req.params.logprobs and lps is not None else None
        if logprob is not None:
            req.logprobs.append(logprob)
        top = _top(req, i, top_ids, top_lps)
        if top is not None:
            req.top_logprobs.append(top)
        constraint = _constraint_end(req, token, accepted[i]) if req.matcher is not None else None
        if constraint is not None:
            req.finish_reason = constraint
            req.matched_stop = token if constraint == "stop" and token in req.stop_ids else None
        elif token in req.stop_ids and idx + 1 >= req.params.min_new_tokens:
            req.finish_reason, req.matched_stop = "stop", token
        elif idx + 1 >= req.max_new_tokens or req.resolved_len >= max_model_len:
            req.finish_reason = "length"
        outputs.append(
            TokenOut(
                req.rid,
                token,
                logprob,
                top,
                req.finish_reason,
                req.matched_stop,
                len(req.prompt_ids),
                req.cached_tokens,
                req.params if idx == 0 else None,  # the first token carries the params
            )
        )
        if req.finish_reason is not None:
            finished.append(req)
    return Completed(ids, outputs, finished)


def _accept_tokens(launched: Launched, ids: list[int], batch_matcher: Any) -> dict[int, bool]:
    """Feed each constrained row's token to its request's matcher (unless the request ended
    meanwhile): row -> whether the matcher accepted it. With `batch_matcher` and several rows,
    on its threads (each request has one row, so the order does not matter)."""
    rows = [
        i
        for i, (req, _) in enumerate(launched.plan)
        if req.matcher is not None and launched.out_index[i] >= 0 and req.finish_reason is None
    ]
    matchers = [launched.plan[i][0].matcher for i in rows]
    if batch_matcher is not None and len(rows) > 1:
        ok = batch_matcher.batch_accept_token(matchers, [ids[i] for i in rows])
    else:
        ok = [m.accept_token(ids[i]) for m, i in zip(matchers, rows, strict=True)]
    return dict(zip(rows, ok, strict=True))


def _constraint_end(req: Req, token: int, accepted: bool) -> FinishReason | None:
    """After the request's matcher was fed `token`: "stop" once the constraint is satisfied
    and allows no more tokens, "abort" (logged) if the token broke it (which the bitmask rules
    out), None while it goes on."""
    assert req.matcher is not None
    if not accepted:
        log.error("request %s: token %d breaks its constraint; aborting it", req.rid, token)
        return "abort"
    return "stop" if req.matcher.is_terminated() else None


def _top(
    req: Req, row: int, top_ids: list[Any] | None, top_lps: list[Any] | None
) -> list[tuple[int, float]] | None:
    """The request's top_logprobs (id, logprob) pairs for this row's token, if it asked."""
    k = req.params.top_logprobs
    if not k or top_ids is None or top_lps is None:
        return None
    return list(zip(top_ids[row][:k], top_lps[row][:k], strict=True))
