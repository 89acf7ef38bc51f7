"""OpenAI response bodies and stream chunks of the server's replies."""

from __future__ import annotations

import json
from typing import Any

from minisgl.gateway.requests import Completion
from minisgl.v1 import common_pb2, generation_pb2

_FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length"}


def _completion_logprobs(lps: Any, offset: int) -> dict[str, Any]:
    """The legacy completions `logprobs` object of some tokens, text offsets from `offset`."""
    tokens = [lp.chosen.token for lp in lps]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.chosen.logprob for lp in lps],
        "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def _logprob_entry(t: Any) -> dict[str, Any]:
    return {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode())}


def _chat_logprobs(lps: Any) -> dict[str, Any]:
    """The chat `logprobs` object of some tokens."""
    return {
        "content": [
            {**_logprob_entry(lp.chosen), "top_logprobs": [_logprob_entry(t) for t in lp.top]}
            for lp in lps
        ]
    }


def usage_body(usages: list[common_pb2.Usage]) -> dict[str, Any]:
    """OpenAI usage of all choices: the prompt once, the completions summed."""
    prompt = usages[0].prompt_tokens
    completion = sum(u.completion_tokens for u in usages)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": usages[0].cached_tokens},
    }


def tool_call_message(text: str, rid: str) -> tuple[dict[str, Any], str] | None:
    """The assistant message with the tool call that a required tool call's output (JSON
    {"name": ..., "arguments": {...}}) describes, and finish reason "tool_calls"; None when
    the output is not such a call (it ended at max_tokens, incomplete)."""
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    function = {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}))}
    tool_call = {"id": f"call_{rid}", "type": "function", "function": function}
    return {"role": "assistant", "content": None, "tool_calls": [tool_call]}, "tool_calls"


def completion_response(
    c: Completion, outs: list[generation_pb2.GenerateResponse], model: str, created: int
) -> dict[str, Any]:
    """The body of a non-streaming reply: one choice per Generate response."""
    choices = []
    for i, out in enumerate(outs):
        choice: dict[str, Any] = {"index": i, "finish_reason": _FINISH.get(out.finish.reason)}
        if c.chat:
            choice["message"] = {"role": "assistant", "content": out.text}
            called = tool_call_message(out.text, out.request_id) if c.tool_call else None
            if called is not None:
                choice["message"], choice["finish_reason"] = called
            choice["logprobs"] = _chat_logprobs(out.logprobs) if c.logprobs else None
        else:
            lp = _completion_logprobs(out.logprobs, 0) if c.logprobs else None
            choice.update(text=out.text, logprobs=lp)
        choices.append(choice)
    return {
        "id": c.rid,
        "object": "chat.completion" if c.chat else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_body([out.usage for out in outs]),
    }


def stream_choice(
    c: Completion, i: int, msg: generation_pb2.StreamGenerateResponse, offset: int
) -> tuple[dict[str, Any] | None, int]:
    """The chunk choice of choice i's stream message (None when it carries nothing to show),
    and that choice's completions text_offset after it."""
    finish = _FINISH.get(msg.finish.reason) if msg.HasField("finish") else None
    if not (msg.text or finish or (c.logprobs and msg.logprobs)):
        return None, offset
    lp: dict[str, Any] | None = None
    if c.chat:
        piece: dict[str, Any] = {"delta": {"content": msg.text} if msg.text else {}}
        if c.logprobs:
            lp = _chat_logprobs(msg.logprobs)
    else:
        if c.logprobs:
            lp = _completion_logprobs(msg.logprobs, offset)
            offset += sum(len(t) for t in lp["tokens"])
        piece = {"text": msg.text}
    piece["logprobs"] = lp
    return {"index": i, **piece, "finish_reason": finish}, offset


class ToolCallStream:
    """A required tool call's stream: the text is held back, and the last message of each
    choice becomes one delta with the whole tool call (finish reason "tool_calls"), or the
    text itself when it is not a complete call."""

    def __init__(self) -> None:
        self.texts: dict[int, list[str]] = {}

    def choice(self, i: int, msg: generation_pb2.StreamGenerateResponse) -> dict[str, Any] | None:
        self.texts.setdefault(i, []).append(msg.text)
        if not msg.HasField("finish"):
            return None
        text = "".join(self.texts.pop(i))
        called = tool_call_message(text, msg.request_id)
        if called is None:
            delta: dict[str, Any] = {"content": text}
            finish = _FINISH.get(msg.finish.reason)
        else:
            (tc,) = called[0]["tool_calls"]
            delta, finish = {"tool_calls": [{"index": 0, **tc}]}, called[1]
        return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
