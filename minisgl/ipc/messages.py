"""Every message that crosses a process boundary, as typed msgspec structs (msgpack on the wire).

Flow: frontend -> tokenizer -> scheduler -> detokenizer -> frontend, plus replies to the
frontend (errors, model info, load, tokenize results) and aborts from the detokenizer to
the scheduler when a stop string matches.

Every `rid` is the frontend's internal id of one call, unique for the life of the server and
never reused; the client's `request_id` is a label that stays in the frontend. So nothing a
worker sends about one call can reach another, even one that reuses a cancelled call's label.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from minisgl.kvcache.radix import CacheEvent
from minisgl.sampling_params import FinishReason, SamplingParams

ChatMessage = dict[str, str]
ErrorCode = Literal["invalid_argument", "internal"]
"""Why a request or call failed: "invalid_argument" (the client's input) or "internal" (an
unexpected error in a worker, logged there with its traceback, or a dead worker)."""


class GenerateReq(msgspec.Struct, tag=True):
    """frontend -> tokenizer: a request to tokenize and queue, checked as far as it can be
    without its token ids (`server.convert.to_generate_req`)."""

    rid: str
    text: str | None
    token_ids: list[int] | None
    chat: list[ChatMessage] | None
    params: SamplingParams
    strict_max_new_tokens: bool  # the client set max_new_tokens: error if it cannot fit


class NewReq(msgspec.Struct, tag=True):
    """tokenizer -> scheduler: a tokenized request, its ids checked (`check_prompt`)."""

    rid: str
    input_ids: list[int]
    params: SamplingParams


class AbortReq(msgspec.Struct, tag=True):
    """-> scheduler (via the tokenizer from the frontend, or from the detokenizer)."""

    rid: str


class TokenOut(msgspec.Struct, array_like=True):
    """One request's result of one step: a new token, and whether it finished.

    `Scheduler.step` returns these; the server's scheduler process sends them on as they are,
    and the offline API reads them in `LLM._on_event`. token_id -1 with finish_reason "abort"
    (sent by the scheduler process when it aborts a request): no token, the request is gone.
    """

    rid: str
    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None  # the top_logprobs (id, logprob) pairs of this token
    finish_reason: FinishReason | None
    matched_stop: int | None
    prompt_tokens: int
    cached_tokens: int
    # On a request's first token only: what the detokenizer needs to know about it (its stop
    # strings and detokenization options), so they travel in one pipe ahead of its tokens.
    params: SamplingParams | None = None


class StepOut(msgspec.Struct, tag=True):
    """scheduler -> detokenizer: everything one step produced."""

    outputs: list[TokenOut]


class Delta(msgspec.Struct, array_like=True):
    """What is new for one request; the last one has finish_reason set."""

    rid: str
    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    top: list[list[tuple[int, float]]] | None
    prompt_tokens: int
    cached_tokens: int
    finish_reason: FinishReason | None
    matched_stop: int | str | None
    token_texts: dict[int, str] | None = None  # with logprobs: each chosen / top id's text


class DeltaBatch(msgspec.Struct, tag=True):
    """detokenizer -> frontend."""

    deltas: list[Delta]


class ReqError(msgspec.Struct, tag=True):
    """-> frontend: a request failed."""

    rid: str
    code: ErrorCode
    message: str


class ModelInfo(msgspec.Struct, tag=True):
    """scheduler -> frontend once warm: the model is loaded and served."""

    model: str
    architecture: str
    context_length: int
    vocab_size: int
    eos_token_ids: list[int]
    has_tokenizer: bool
    dtype: str
    device: str
    attention_backend: str
    page_size: int
    kv_cache_tokens: int
    radix_cache: bool
    chunked_prefill_size: int
    max_running_requests: int


class Load(msgspec.Struct, tag=True):
    """scheduler -> frontend, whenever it changes (rate-limited)."""

    waiting: int
    running: int
    kv_usage: float
    kv_busy: float
    cache_hit_rate: float
    retractions: int
    prompt_tokens: int = 0
    """Prompt tokens of every request admitted since start."""
    cached_tokens: int = 0
    """Of those, tokens served from the prefix cache."""


class TokenizeCall(msgspec.Struct, tag=True):
    """frontend -> tokenizer: a Tokenize or Detokenize RPC."""

    call_id: int
    text: str | None = None
    chat: list[ChatMessage] | None = None
    token_ids: list[int] | None = None
    detokenize: bool = False
    skip_special_tokens: bool = True


class TokenizeResult(msgspec.Struct, tag=True):
    """tokenizer -> frontend: the answer to a TokenizeCall (error set if it failed, with a
    code as in ReqError)."""

    call_id: int
    token_ids: list[int] | None = None
    text: str | None = None
    error: str | None = None
    code: ErrorCode = "invalid_argument"


class WorkerReady(msgspec.Struct, tag=True):
    """tokenizer / detokenizer -> frontend: loaded and listening (the scheduler sends ModelInfo)."""

    name: str


class ReleaseCache(msgspec.Struct, tag=True):
    """frontend -> scheduler: drop every unlocked prefix-cache entry (sglang's FlushCache)."""

    call_id: int


class CacheReleased(msgspec.Struct, tag=True):
    """scheduler -> frontend: the answer to ReleaseCache; the pages the cache still holds
    (those of running requests) and how many it gave back."""

    call_id: int
    freed_pages: int
    cached_pages: int


class KvEvents(msgspec.Struct, tag=True):
    """scheduler -> frontend: what the radix cache stored and freed since the last KvEvents
    (kvcache/radix.py), for sglang's SubscribeKvEvents; `block_size` is the page size."""

    block_size: int
    events: list[CacheEvent]


class Shutdown(msgspec.Struct, tag=True):
    """-> any worker: exit now."""


Message = (
    GenerateReq
    | NewReq
    | AbortReq
    | StepOut
    | DeltaBatch
    | ReqError
    | ModelInfo
    | Load
    | TokenizeCall
    | TokenizeResult
    | WorkerReady
    | ReleaseCache
    | CacheReleased
    | KvEvents
    | Shutdown
)
