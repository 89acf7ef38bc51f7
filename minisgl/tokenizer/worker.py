"""Tokenizer and detokenizer worker processes.

The tokenizer turns GenerateReqs into token ids (overlapping with the scheduler's GPU
work), checks them (`check_prompt`: the ids' range and the context length, checked nowhere
earlier), compiles their structured-output constraints (the scheduler process compiles each
distinct constraint again, from its own cache), and forwards aborts in order. The
detokenizer turns the scheduler's token ids into UTF-8-safe text deltas, matches stop
strings (and asks the scheduler to abort a request that hit one) and sends deltas to the
frontend.

Neither lets one request end the process: bad input (ValueError, a chat template that
refuses the conversation) fails that request with "invalid_argument"; any other exception
while handling one request is logged with its traceback and fails that request alone with
"internal". Only faults outside per-request handling (the sockets) end the worker.
"""

from __future__ import annotations

import logging

import jinja2
import zmq

from minisgl.config import EngineConfig
from minisgl.grammar import GrammarCompiler
from minisgl.ipc.messages import (
    AbortReq,
    Delta,
    DeltaBatch,
    ErrorCode,
    GenerateReq,
    Message,
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
from minisgl.sampling_params import FinishReason, SamplingParams
from minisgl.tokenizer.tokenizer import (
    IncrementalDetokenizer,
    Prompt,
    Tokenizer,
    check_prompt,
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


def _encode(tok: Tokenizer | None, prompt: Prompt) -> list[int]:
    """encode_prompt, with a chat template's refusal (jinja2 TemplateError, as raised by
    templates that call `raise_exception`) as a ValueError naming `prompt.chat`. A template
    that does not compile is the model's fault, not the request's: it stays an error."""
    try:
        return encode_prompt(tok, prompt)
    except jinja2.TemplateSyntaxError:
        raise
    except jinja2.TemplateError as e:
        raise ValueError(f"prompt.chat: the model's chat template refused it: {e}") from e


def _internal(e: Exception) -> str:
    return f"internal error: {type(e).__name__}: {e}"


def tokenizer_reply(
    tok: Tokenizer | None,
    msg: Message,
    vocab: int,
    max_model_len: int,
    grammars: GrammarCompiler | None = None,
) -> Message | None:
    """What the tokenizer sends for one message: a NewReq or the AbortReq (to the scheduler),
    a ReqError or a TokenizeResult (to the frontend), or None. Never raises.

    A structured-output constraint is compiled here with `grammars` (cached by constraint),
    so one that does not compile fails its request before it reaches the scheduler."""
    try:
        if isinstance(msg, AbortReq):
            return msg
        if isinstance(msg, GenerateReq):
            ids = _encode(tok, _prompt_of(msg.text, msg.chat, msg.token_ids))
            strict = msg.params.max_new_tokens if msg.strict_max_new_tokens else None
            field = "prompt.token_ids" if msg.token_ids is not None else "prompt"
            check_prompt(ids, strict, vocab, max_model_len, field)
            if grammars is not None:
                _compile(grammars, msg.params)
            return NewReq(msg.rid, ids, msg.params)
        if isinstance(msg, TokenizeCall):
            return _tokenize_call(tok, msg, vocab, max_model_len)
        return None
    except ValueError as e:
        return _failure(msg, "invalid_argument", str(e))
    except Exception as e:
        log.exception("unexpected error in the tokenizer while handling %s", type(msg).__name__)
        return _failure(msg, "internal", _internal(e))


def _compile(grammars: GrammarCompiler, params: SamplingParams) -> None:
    """Compile the request's constraint; ValueError naming its gRPC field if it does not."""
    try:
        grammars.compile(params)
    except ValueError as e:
        raise ValueError(f"constraint.{e}") from None


def _failure(msg: Message, code: ErrorCode, message: str) -> Message | None:
    if isinstance(msg, GenerateReq):
        return ReqError(msg.rid, code, message)
    if isinstance(msg, TokenizeCall):
        return TokenizeResult(msg.call_id, error=message, code=code)
    return None


def run_tokenizer(cfg: EngineConfig, endpoints: Endpoints) -> None:
    """Tokenize requests and answer Tokenize/Detokenize calls until Shutdown."""
    source = resolve_model(cfg.model, cfg.dummy_weights, cfg.revision)
    max_model_len = source.context_length(cfg.max_model_len)
    tok = tokenizer_for(source, cfg.tokenizer)
    vocab = source.config.vocab_size
    grammars = GrammarCompiler(tok, vocab, source.config.eos_token_ids)  # xgrammar on first use
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
        if msg is None:
            continue
        reply = tokenizer_reply(tok, msg, vocab, max_model_len, grammars)
        if isinstance(reply, NewReq | AbortReq):
            to_scheduler.send(reply)
        elif reply is not None:
            to_frontend.send(reply)
    ctx.destroy(linger=0)


def _tokenize_call(
    tok: Tokenizer | None, call: TokenizeCall, vocab: int, max_model_len: int
) -> TokenizeResult:
    if call.detokenize:
        ids = call.token_ids or []
        if tok is None:
            raise ValueError("this model has no tokenizer")
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"token_ids: ids must be below the vocabulary size {vocab}")
        return TokenizeResult(call.call_id, text=tok.decode(ids, call.skip_special_tokens))
    if call.token_ids is not None:  # as a generation prompt: Tokenize accepts what Generate does
        check_prompt(call.token_ids, None, vocab, max_model_len, "prompt.token_ids")
    prompt = _prompt_of(call.text, call.chat, call.token_ids)
    return TokenizeResult(call.call_id, token_ids=_encode(tok, prompt))


def run_detokenizer(cfg: EngineConfig, endpoints: Endpoints) -> None:
    """Turn StepOuts into DeltaBatches until Shutdown."""
    source = resolve_model(cfg.model, cfg.dummy_weights, cfg.revision)
    tok = tokenizer_for(source, cfg.tokenizer)
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
        deltas, errors, aborts = detokenize_step(tok, states, msg)
        for abort in aborts:
            to_scheduler.send(abort)
        if deltas:
            to_frontend.send(DeltaBatch(deltas))
        for error in errors:
            to_frontend.send(error)
    ctx.destroy(linger=0)


def detokenize_step(
    tok: Tokenizer | None, states: dict[str, IncrementalDetokenizer | None], step: StepOut
) -> tuple[list[Delta], list[ReqError], list[AbortReq]]:
    """One step's deltas and failed requests (for the frontend) and the aborts for the
    scheduler (a stop string matched, or the request failed here). Never raises: an
    unexpected error in one request's output fails that request alone."""
    deltas: list[Delta] = []
    errors: list[ReqError] = []
    aborts: list[AbortReq] = []
    for out in step.outputs:
        try:
            delta = _detokenize(tok, states, out)
        except Exception as e:
            log.exception("unexpected error in the detokenizer for request %s", out.rid)
            states.pop(out.rid, None)  # its later outputs are dropped until the abort lands
            errors.append(ReqError(out.rid, "internal", _internal(e)))
            aborts.append(AbortReq(out.rid))
            continue
        if delta is None:
            continue
        if delta.finish_reason is not None and out.finish_reason is None:
            aborts.append(AbortReq(out.rid))  # a stop string matched
        deltas.append(delta)
    return deltas, errors, aborts


def _detokenize(
    tok: Tokenizer | None, states: dict[str, IncrementalDetokenizer | None], out: TokenOut
) -> Delta | None:
    """The delta for one TokenOut, or None if its request already finished here."""
    if out.params is not None and tok is not None:
        p = out.params
        states[out.rid] = IncrementalDetokenizer(
            tok, p.stop, p.include_stop_str_in_output, p.skip_special_tokens, p.min_new_tokens
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
    finish: FinishReason | None = out.finish_reason
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
