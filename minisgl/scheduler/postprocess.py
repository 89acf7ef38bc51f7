"""A launched step's postprocessing: its tokens read back, stop conditions, the TokenOuts."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from minisgl.engine.step import LaunchedStep
from minisgl.ipc.messages import TokenOut
from minisgl.sampling_params import FinishReason
from minisgl.scheduler.request import Req

log = logging.getLogger(__name__)


@dataclass
class Launched:
    """A step whose forward and sampling were queued on the device, tokens not yet read."""

    plan: list[tuple[Req, int]]
    out_index: list[int]  # per row: index of its placeholder in req.output_ids, -1 if none
    step: LaunchedStep


@dataclass
class Completed:
    """What reading a launched step back gave: every row's token id (the ranks hash them),
    one TokenOut per request that produced a token, and the requests that finished."""

    token_ids: list[int]
    outputs: list[TokenOut]
    finished: list[Req]


def complete(launched: Launched, max_model_len: int) -> Completed:
    """Wait for a launched step's tokens, put them in place of their placeholders and finish
    the requests that reached a stop token, the end of their constraint or their length. A
    request that finished or was aborted while the step was in flight gets nothing (its
    token is dropped)."""
    ids, lps, top_ids, top_lps = launched.step.read()
    outputs: list[TokenOut] = []
    finished: list[Req] = []
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
        constraint = _advance_constraint(req, token) if req.matcher is not None else None
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


def _advance_constraint(req: Req, token: int) -> FinishReason | None:
    """Feed `token` to the request's matcher: "stop" once the constraint is satisfied and
    allows no more tokens, "abort" (logged) if the token broke it (which the bitmask rules
    out), None while it goes on."""
    assert req.matcher is not None
    if not req.matcher.accept_token(token):
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
