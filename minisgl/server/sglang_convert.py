"""sglang.grpc.scheduler (smg-grpc-proto) <-> minisgl.v1 conversions (no I/O).

smg sends tokenized requests in sglang's SamplingParams; each becomes the minisgl.v1
StreamGenerateRequest that the frontend's pipeline already validates and runs, so both
protocols share one path. What minisgl cannot do is refused here, naming the sglang field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from smg_grpc_proto import sglang_scheduler_pb2 as sgl

from minisgl.ipc.messages import Delta
from minisgl.v1 import generation_pb2

MAX_N = 16
"""Most samples one request may ask for (sampling_params.n)."""


class Unsupported(ValueError):
    """A field minisgl does not implement (UNIMPLEMENTED); plain ValueError: bad input."""


@dataclass
class Converted:
    """A Generate request in minisgl's terms: `n` copies of `request` run as one call."""

    request: generation_pb2.StreamGenerateRequest
    n: int
    stream: bool


def to_minisgl(req: sgl.GenerateRequest) -> Converted:
    """The minisgl.v1 request of an sglang GenerateRequest; Unsupported or ValueError, naming
    the field, for what cannot run. Ranges are checked later, by convert.to_generate_req."""
    _refuse_unsupported(req)
    p = req.sampling_params
    if not req.tokenized.input_ids:
        raise ValueError("tokenized.input_ids: must not be empty (send a tokenized prompt)")
    if p.n > MAX_N:
        raise ValueError(f"sampling_params.n: at most {MAX_N} (got {p.n})")
    if req.top_logprobs_num < 0:
        raise ValueError(f"top_logprobs_num: must be >= 0 (got {req.top_logprobs_num})")
    out = generation_pb2.StreamGenerateRequest(request_id=req.request_id)
    out.prompt.token_ids.ids.extend(req.tokenized.input_ids)
    s = out.sampling
    # sglang's fields have no presence: its senders fill in every default (temperature 1,
    # top_p 1, top_k -1); 0 for repetition_penalty means unset, as in sglang's servicer.
    s.temperature = p.temperature
    s.top_p = p.top_p
    s.top_k = p.top_k
    s.min_p = p.min_p
    s.repetition_penalty = p.repetition_penalty or 1.0
    s.presence_penalty = p.presence_penalty
    s.frequency_penalty = p.frequency_penalty
    st = out.stopping
    if p.HasField("max_new_tokens"):
        st.max_new_tokens = p.max_new_tokens
    st.min_new_tokens = p.min_new_tokens
    st.stop.extend(p.stop)
    st.stop_token_ids.extend(p.stop_token_ids)
    st.ignore_eos = p.ignore_eos
    st.include_stop_str_in_output = p.no_stop_trim
    out.output.skip_special_tokens = p.skip_special_tokens
    if req.return_logprob:
        out.output.logprobs = True
        out.output.top_logprobs = req.top_logprobs_num
    kind = p.WhichOneof("constraint")
    if kind is not None:  # compiled and checked by the tokenizer worker, as on minisgl.v1
        setattr(out.constraint, _CONSTRAINTS[kind], getattr(p, kind))
    return Converted(out, max(p.n, 1), req.stream)


#: sglang's constraint fields -> minisgl.v1's Constraint fields.
_CONSTRAINTS = {"regex": "regex", "json_schema": "json_schema", "ebnf_grammar": "grammar"}


def _refuse_unsupported(req: sgl.GenerateRequest) -> None:
    p = req.sampling_params
    if p.WhichOneof("constraint") == "structural_tag":
        raise Unsupported("sampling_params.structural_tag: not supported (use json_schema)")
    if p.logit_bias:
        raise Unsupported("sampling_params.logit_bias: not supported")
    if p.HasField("custom_params") and p.custom_params.fields:
        raise Unsupported("sampling_params.custom_params: not supported")
    if req.HasField("mm_inputs"):
        raise Unsupported("mm_inputs: multimodal inputs are not supported")
    if req.input_embeds:
        raise Unsupported("input_embeds: not supported (send tokenized.input_ids)")
    if req.return_hidden_states:
        raise Unsupported("return_hidden_states: not supported")
    if req.lora_id:
        raise Unsupported("lora_id: LoRA adapters are not supported")
    if req.custom_logit_processor:
        raise Unsupported("custom_logit_processor: not supported")
    if req.HasField("disaggregated_params"):
        raise Unsupported("disaggregated_params: prefill/decode disaggregation is not supported")
    if req.token_ids_logprob:
        raise Unsupported("token_ids_logprob: logprobs of chosen token ids are not supported")
    if req.return_logprob and req.logprob_start_len >= 0:
        raise Unsupported(
            "logprob_start_len: prompt logprobs are not supported (set -1: output logprobs only)"
        )
    if req.HasField("data_parallel_rank") and req.data_parallel_rank != 0:
        raise ValueError(f"data_parallel_rank: only rank 0 exists (got {req.data_parallel_rank})")


_FIELDS = (
    (re.compile(r"^(sampling|stopping)\."), "sampling_params."),
    (re.compile(r"^output\.top_logprobs"), "top_logprobs_num"),
    (re.compile(r"^prompt\.token_ids"), "tokenized.input_ids"),
    (re.compile(r"^request_id"), "request_id"),
    (re.compile(r"^constraint\.(regex|json_schema)"), r"sampling_params.\1"),
    (re.compile(r"^constraint\.grammar"), "sampling_params.ebnf_grammar"),
)


def sglang_field_names(message: str) -> str:
    """A minisgl.v1 validation message with its field named as sglang's proto names it."""
    for pattern, name in _FIELDS:
        if pattern.match(message):
            return pattern.sub(name, message, count=1)
    return message


def output_logprobs(deltas: list[Delta]) -> sgl.OutputLogProbs | None:
    """The OutputLogProbs of `deltas`' tokens; None when none were asked for."""
    if all(d.logprobs is None and d.top is None for d in deltas):
        return None
    out = sgl.OutputLogProbs()
    for d in deltas:
        out.token_ids.extend(d.token_ids)
        out.token_logprobs.extend(d.logprobs or [0.0] * len(d.token_ids))
        for top in d.top or []:
            out.top_logprobs.append(
                sgl.TopLogProbs(values=[lp for _, lp in top], token_ids=[t for t, _ in top])
            )
    return out


@dataclass
class Sample:
    """What one of a call's n samples has produced so far."""

    index: int
    token_ids: list[int]
    deltas: list[Delta]
    prompt_tokens: int = 0
    cached_tokens: int = 0

    def add(self, delta: Delta) -> None:
        self.token_ids.extend(delta.token_ids)
        self.prompt_tokens, self.cached_tokens = delta.prompt_tokens, delta.cached_tokens
        if delta.logprobs is not None or delta.top is not None:
            self.deltas.append(delta)


def chunk(rid: str, sample: Sample, delta: Delta) -> sgl.GenerateResponse:
    """A streaming chunk: this delta's tokens, cumulative counts."""
    msg = sgl.GenerateStreamChunk(
        token_ids=delta.token_ids,
        prompt_tokens=delta.prompt_tokens,
        completion_tokens=len(sample.token_ids),
        cached_tokens=delta.cached_tokens,
        index=sample.index,
    )
    lp = output_logprobs([delta])
    if lp is not None:
        msg.output_logprobs.CopyFrom(lp)
    return sgl.GenerateResponse(request_id=rid, chunk=msg)


def complete(rid: str, sample: Sample, last: Delta, stream: bool) -> sgl.GenerateResponse:
    """The final message of one sample. Streaming: its tokens went in the chunks, so
    output_ids is empty; otherwise it holds every token and every logprob."""
    msg = sgl.GenerateComplete(
        output_ids=[] if stream else sample.token_ids,
        finish_reason=last.finish_reason or "stop",
        prompt_tokens=sample.prompt_tokens,
        completion_tokens=len(sample.token_ids),
        cached_tokens=sample.cached_tokens,
        index=sample.index,
    )
    if isinstance(last.matched_stop, str):
        msg.matched_stop_str = last.matched_stop
    elif isinstance(last.matched_stop, int):
        msg.matched_token_id = last.matched_stop
    lp = None if stream else output_logprobs(sample.deltas)
    if lp is not None:
        msg.output_logprobs.CopyFrom(lp)
    return sgl.GenerateResponse(request_id=rid, complete=msg)
