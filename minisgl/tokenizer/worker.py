"""Tokenizer and detokenizer worker processes.

The tokenizer turns GenerateReqs into token ids (overlapping with the scheduler's GPU
work), checks what needs the token count, and forwards aborts in order. The detokenizer
turns the scheduler's token ids into UTF-8-safe text deltas, matches stop strings (and
asks the scheduler to abort a request that hit one) and sends deltas to the frontend.
"""

from __future__ import annotations

import logging

import zmq

from minisgl.config import EngineConfig
from minisgl.ipc.messages import (
    AbortReq,
    Delta,
    DeltaBatch,
    GenerateReq,
    NewReq,
    ReqError,
    Shutdown,
    StepOut,
    TokenizeCall,
    TokenizeResult,
    TokenOut,
    WorkerReady,
)
from minisgl.ipc.transport import Endpoints, Receiver, Sender
from minisgl.models.source import resolve_model
from minisgl.tokenizer.tokenizer import (
    IncrementalDetokenizer,
    Prompt,
    Tokenizer,
    encode_prompt,
    tokenizer_for,
)

log = logging.getLogger(__name__)


def _prompt_of(
    text: str | None, chat: list[dict[str, str]] | None, ids: list[int] | None
) -> Prompt:
    if text is not None:
        return text
    if chat is not None:
        return chat
    return ids or []


def run_tokenizer(cfg: EngineConfig, endpoints: Endpoints) -> None:
    """Tokenize requests and answer Tokenize/Detokenize calls until Shutdown."""
    source = resolve_model(cfg.model, cfg.dummy_weights)
    max_model_len = source.context_length(cfg.max_model_len)
    tok = tokenizer_for(source)
    vocab = source.config.vocab_size
    ctx = zmq.Context()
    inbox = Receiver(ctx, endpoints.tokenizer)
    to_scheduler = Sender(ctx, endpoints.scheduler)
    to_frontend = Sender(ctx, endpoints.frontend)
    to_frontend.send(WorkerReady("tokenizer"))
    log.info("tokenizer ready")
    while True:
        msg = inbox.recv(None)
        if isinstance(msg, Shutdown):
            break
        if isinstance(msg, AbortReq):
            to_scheduler.send(msg)
        elif isinstance(msg, GenerateReq):
            try:
                ids = encode_prompt(tok, _prompt_of(msg.text, msg.chat, msg.token_ids))
                _check_length(ids, msg, vocab, max_model_len)
            except ValueError as e:
                to_frontend.send(ReqError(msg.rid, "invalid_argument", str(e)))
                continue
            to_scheduler.send(NewReq(msg.rid, ids, msg.params))
        elif isinstance(msg, TokenizeCall):
            to_frontend.send(_tokenize_call(tok, msg, vocab))
    ctx.destroy(linger=0)


def _check_length(ids: list[int], msg: GenerateReq, vocab: int, max_model_len: int) -> None:
    if not ids:
        raise ValueError("prompt: is empty after tokenization")
    if any(not 0 <= t < vocab for t in ids):
        raise ValueError(f"prompt.token_ids: ids must be below the vocabulary size {vocab}")
    if len(ids) >= max_model_len:
        raise ValueError(
            f"prompt: {len(ids)} tokens reach the context length {max_model_len}; "
            "no room to generate"
        )
    if msg.strict_max_new_tokens and len(ids) + msg.params.max_new_tokens > max_model_len:
        raise ValueError(
            f"stopping.max_new_tokens: prompt ({len(ids)} tokens) + max_new_tokens "
            f"({msg.params.max_new_tokens}) exceed the context length {max_model_len}"
        )


def _tokenize_call(tok: Tokenizer | None, call: TokenizeCall, vocab: int) -> TokenizeResult:
    try:
        if call.detokenize:
            ids = call.token_ids or []
            if tok is None:
                raise ValueError("this model has no tokenizer")
            if any(not 0 <= t < vocab for t in ids):
                raise ValueError(f"token_ids: ids must be below the vocabulary size {vocab}")
            return TokenizeResult(call.call_id, text=tok.decode(ids, call.skip_special_tokens))
        prompt = _prompt_of(call.text, call.chat, call.token_ids)
        return TokenizeResult(call.call_id, token_ids=encode_prompt(tok, prompt))
    except ValueError as e:
        return TokenizeResult(call.call_id, error=str(e))


def run_detokenizer(cfg: EngineConfig, endpoints: Endpoints) -> None:
    """Turn StepOuts into DeltaBatches until Shutdown."""
    tok = tokenizer_for(resolve_model(cfg.model, cfg.dummy_weights))
    ctx = zmq.Context()
    inbox = Receiver(ctx, endpoints.detokenizer)
    to_frontend = Sender(ctx, endpoints.frontend)
    to_scheduler = Sender(ctx, endpoints.scheduler)
    states: dict[str, IncrementalDetokenizer | None] = {}
    to_frontend.send(WorkerReady("detokenizer"))
    log.info("detokenizer ready")
    while True:
        msg = inbox.recv(None)
        if isinstance(msg, Shutdown):
            break
        if not isinstance(msg, StepOut):
            continue
        deltas = []
        for out in msg.outputs:
            delta = _detokenize(tok, states, out)
            if delta is None:
                continue
            if delta.finish_reason is not None and out.finish_reason is None:
                to_scheduler.send(AbortReq(out.rid))  # a stop string matched
            deltas.append(delta)
        if deltas:
            to_frontend.send(DeltaBatch(deltas))
    ctx.destroy(linger=0)


def _detokenize(
    tok: Tokenizer | None, states: dict[str, IncrementalDetokenizer | None], out: TokenOut
) -> Delta | None:
    """The delta for one TokenOut, or None if its request already finished here."""
    if out.params is not None and tok is not None:
        p = out.params
        states[out.rid] = IncrementalDetokenizer(
            tok, p.stop, p.include_stop_str_in_output, p.skip_special_tokens
        )
    elif out.params is not None:
        states[out.rid] = None
    if out.rid not in states:
        return None  # finished by a stop string; the scheduler's abort is on its way
    if out.token_id < 0:  # aborted in the scheduler
        del states[out.rid]
        return Delta(
            out.rid, [], "", None, None, out.prompt_tokens, out.cached_tokens, "abort", None
        )
    detok = states[out.rid]
    text = ""
    finish: str | None = out.finish_reason
    matched: int | str | None = out.matched_stop
    if detok is not None:
        text = detok.add([out.token_id])
        if detok.matched_stop is not None:
            finish, matched = "stop", detok.matched_stop
        if finish is not None:
            text += detok.flush()
    if finish is not None:
        del states[out.rid]
    texts = None
    if tok is not None and (out.logprob is not None or out.top is not None):
        ids = {out.token_id, *(t for t, _ in out.top or ())}
        texts = {i: tok.decode([i]) for i in ids}
    return Delta(
        out.rid,
        [out.token_id],
        text,
        None if out.logprob is None else [out.logprob],
        None if out.top is None else [out.top],
        out.prompt_tokens,
        out.cached_tokens,
        finish,
        matched,
        texts,
    )
