"""Proto <-> engine conversions and request validation (no torch, no I/O)."""

from __future__ import annotations

import re
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from minisgl.ipc.messages import Delta, GenerateReq, ModelInfo
from minisgl.sampling_params import FinishReason, SamplingParams
from minisgl.server.config import RequestLimits
from minisgl.v1 import common_pb2, generation_pb2

MAX_TOP_LOGPROBS = 20
_RID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

FINISH_REASONS: dict[FinishReason, common_pb2.FinishReason.ValueType] = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}

AnyGenerateRequest = generation_pb2.GenerateRequest | generation_pb2.StreamGenerateRequest


def to_generate_req(
    req: AnyGenerateRequest, rid: str, info: ModelInfo, limits: RequestLimits | None = None
) -> GenerateReq:
    """Validate a Generate/StreamGenerate request; ValueError names the offending field.

    Checks what needs no token count: the prompt's shape, the sampling and stopping fields'
    ranges (`SamplingParams.validate`), and `limits` (the one place that checks them; the
    offline API has none: its caller is the operator). The token ids' range and the context
    length are checked by the tokenizer worker (`tokenizer.check_prompt`), which knows them.
    An unset field takes SamplingParams' default."""
    limits = limits or RequestLimits()
    text, chat, ids = prompt_parts(req.prompt, info, limits)
    s, st, out = req.sampling, req.stopping, req.output
    if out.top_logprobs > MAX_TOP_LOGPROBS:
        raise ValueError(
            f"output.top_logprobs: at most {MAX_TOP_LOGPROBS} (got {out.top_logprobs})"
        )
    if len(st.stop) > limits.max_stop_strings:
        raise ValueError(
            f"stopping.stop: at most {limits.max_stop_strings} stop strings (got {len(st.stop)})"
        )
    long = next((i for i, x in enumerate(st.stop) if len(x) > limits.max_stop_string_chars), None)
    if long is not None:
        raise ValueError(
            f"stopping.stop: stop string {long} has {len(st.stop[long])} characters, "
            f"at most {limits.max_stop_string_chars}"
        )
    default = SamplingParams()
    params = SamplingParams(
        temperature=s.temperature if s.HasField("temperature") else default.temperature,
        top_p=s.top_p if s.HasField("top_p") else default.top_p,
        top_k=s.top_k if s.HasField("top_k") else default.top_k,
        min_p=s.min_p if s.HasField("min_p") else default.min_p,
        repetition_penalty=s.repetition_penalty
        if s.HasField("repetition_penalty")
        else default.repetition_penalty,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        seed=s.seed if s.HasField("seed") else None,
        max_new_tokens=st.max_new_tokens
        if st.HasField("max_new_tokens")
        else default.max_new_tokens,
        min_new_tokens=st.min_new_tokens,
        stop=list(st.stop),
        stop_token_ids=list(st.stop_token_ids),
        include_stop_str_in_output=st.include_stop_str_in_output,
        ignore_eos=st.ignore_eos,
        logprobs=out.logprobs,
        top_logprobs=out.top_logprobs,
        skip_special_tokens=out.skip_special_tokens
        if out.HasField("skip_special_tokens")
        else default.skip_special_tokens,
        **constraint_fields(req.constraint),
    )
    _validate_params(params, info.vocab_size)
    return GenerateReq(rid, text, ids, chat, params, st.HasField("max_new_tokens"))


def constraint_fields(c: common_pb2.Constraint) -> dict[str, Any]:
    """The SamplingParams fields of a Constraint (empty when none is set)."""
    kind = c.WhichOneof("kind")
    if kind is None:
        return {}
    if kind == "json_object":
        if not c.json_object:
            raise ValueError("constraint.json_object: must be true when set")
        return {"json_object": True}
    if kind == "choice":
        return {"choice": list(c.choice.choices)}
    return {kind: getattr(c, kind)}


_FIELD_PREFIX = {
    **{k: "constraint." for k in ("json_schema", "json_object", "regex", "grammar", "choice")},
    "max_new_tokens": "stopping.",
    "min_new_tokens": "stopping.",
    "stop": "stopping.",
    "stop_token_ids": "stopping.",
    "top_logprobs": "output.",
}


def _validate_params(params: SamplingParams, vocab: int) -> None:
    try:
        params.validate(vocab)
    except ValueError as e:
        name = str(e).split(":", 1)[0]
        raise ValueError(f"{_FIELD_PREFIX.get(name, 'sampling.')}{e}") from None


def prompt_parts(
    prompt: common_pb2.Prompt, info: ModelInfo, limits: RequestLimits | None = None
) -> tuple[str | None, list[dict[str, str]] | None, list[int] | None]:
    """(text, chat, token_ids) of a Prompt, exactly one set; ValueError if invalid."""
    limits = limits or RequestLimits()
    kind = prompt.WhichOneof("kind")
    limit = info.context_length
    max_chars = limits.prompt_chars(limit)
    if kind == "text":
        if not prompt.text:
            raise ValueError("prompt.text: must not be empty")
        if not info.has_tokenizer:
            raise ValueError("prompt.text: this model has no tokenizer; send prompt.token_ids")
        if len(prompt.text) > max_chars:
            raise ValueError(
                f"prompt.text: {len(prompt.text)} characters, at most {max_chars} "
                f"(far over the context length {limit})"
            )
        return prompt.text, None, None
    if kind == "token_ids":  # checked where every prompt's ids are: tokenizer.check_prompt
        return None, None, list(prompt.token_ids.ids)
    if kind == "chat":
        messages = prompt.chat.messages
        if not messages:
            raise ValueError("prompt.chat: needs at least one message")
        if len(messages) > limits.max_chat_messages:
            raise ValueError(
                f"prompt.chat: at most {limits.max_chat_messages} messages (got {len(messages)})"
            )
        if not info.has_tokenizer:
            raise ValueError("prompt.chat: this model has no tokenizer; send prompt.token_ids")
        for i, m in enumerate(messages):
            if not m.role:
                raise ValueError(f"prompt.chat: every message needs a role (message {i})")
            if len(m.role) > limits.max_role_chars:
                raise ValueError(
                    f"prompt.chat[{i}].role: {len(m.role)} characters, "
                    f"at most {limits.max_role_chars}"
                )
        chars = sum(len(m.content) for m in messages)
        if chars > max_chars:
            raise ValueError(
                f"prompt.chat: {chars} characters of content, at most {max_chars} "
                f"(far over the context length {limit})"
            )
        return None, [{"role": m.role, "content": m.content} for m in messages], None
    raise ValueError("prompt: set one of text, token_ids or chat")


def check_request_id(rid: str) -> None:
    if not _RID.fullmatch(rid):
        raise ValueError("request_id: 1-128 characters of letters, digits, '.', '_', ':' or '-'")


def logprobs_pb(delta: Delta) -> list[common_pb2.TokenLogprobs]:
    """The TokenLogprobs of a delta's tokens (empty when not asked for)."""
    if delta.logprobs is None and delta.top is None:
        return []
    texts = delta.token_texts or {}
    out = []
    for i, tok in enumerate(delta.token_ids):
        chosen = common_pb2.TokenLogprob(
            token_id=tok,
            logprob=delta.logprobs[i] if delta.logprobs is not None else 0.0,
            token=texts.get(tok, ""),
        )
        top = [] if delta.top is None else delta.top[i]
        out.append(
            common_pb2.TokenLogprobs(
                chosen=chosen,
                top=[
                    common_pb2.TokenLogprob(token_id=t, logprob=lp, token=texts.get(t, ""))
                    for t, lp in top
                ],
            )
        )
    return out


def finish_pb(delta: Delta) -> common_pb2.Finish:
    reason = delta.finish_reason
    finish = common_pb2.Finish(
        reason=common_pb2.FINISH_REASON_UNSPECIFIED if reason is None else FINISH_REASONS[reason]
    )
    if isinstance(delta.matched_stop, str):
        finish.stop_string = delta.matched_stop
    elif isinstance(delta.matched_stop, int):
        finish.stop_token_id = delta.matched_stop
    return finish


def bad_utf8_field(descriptor: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """The dotted name of a string field of serialized `data` that is not valid UTF-8.

    protobuf only says "String field had bad UTF-8"; this walks the wire format to name the
    field. None if there is none, or if `data` is not well-formed enough to tell.
    """
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                size, pos = _varint(data, pos)
                value, pos = data[pos : pos + size], pos + size
                field = descriptor.fields_by_number.get(number)
                if field is None:
                    continue
                name = prefix + field.name
                if field.type == FieldDescriptor.TYPE_STRING and not _is_utf8(value):
                    return name
                if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
                    found = bad_utf8_field(field.message_type, value, name + ".")
                    if found is not None:
                        return found
            else:
                return None  # groups are not proto3
    except IndexError:
        return None
    return None


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
