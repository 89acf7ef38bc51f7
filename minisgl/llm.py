"""The offline Python API: `LLM(model).generate(prompts, params)`, the scheduler in-process."""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from minisgl.config import EngineConfig
from minisgl.ipc.messages import TokenOut
from minisgl.models.source import DEMO_DIR
from minisgl.sampling_params import FinishReason, SamplingParams
from minisgl.scheduler.engine import launch_engine
from minisgl.tokenizer.tokenizer import (
    IncrementalDetokenizer,
    Prompt,
    Tokenizer,
    check_prompt,
    encode_prompt,
    tokenizer_for,
)

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    """The result of one prompt."""

    rid: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None  # None when text is unavailable (LLM.text_unavailable says why)
    finish_reason: FinishReason
    matched_stop: int | str | None  # the stop token id or stop string that ended it
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache


@dataclass
class _Pending:
    prompt_ids: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer | None
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    cached_tokens: int = 0
    chunks: list[str] | None = None  # text not yet taken by stream(); None when not streamed


class LLM:
    """An in-process engine. `model`: checkpoint directory, preset name, or None for the demo.

    Keyword options are EngineConfig fields (dtype, device, page_size, dummy_weights, ...).
    """

    def __init__(self, model: str | None = None, **options: Any) -> None:
        self.config = EngineConfig.from_options(model, options)
        engine = launch_engine(self.config)
        # With tensor parallelism the other ranks are child processes: stop them when this
        # object goes (or at exit). The finalizer must not hold `self`.
        self._close = weakref.finalize(self, engine.close)
        self.model_name = engine.source.name
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.source.config.vocab_size
        self.runner = engine.runner
        self.scheduler = engine.scheduler
        self.tokenizer = tokenizer_for(engine.source, self.config.tokenizer)
        self.scheduler.use_tokenizer(self.tokenizer)  # for structured-output constraints
        self.text_unavailable = _text_unavailable(
            self.model_name, self.tokenizer, engine.source.config.vocab_size
        )
        """Why outputs cannot be shown as text (RequestOutput.text is None then: read its
        token_ids), or None when they can."""
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the other tensor-parallel ranks, if any (also done when the LLM is collected)."""
        self._close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(
        self, prompt: Prompt, params: SamplingParams | None = None, *, stream: bool = False
    ) -> str:
        """Queue one prompt; returns its request id. Raises ValueError for invalid input.

        stream: decode text as tokens arrive (see `stream`), not once at the end. Generation
        stops at the context length if max_new_tokens does not fit in it.
        """
        params = params or SamplingParams()
        if params.stop and self.text_unavailable is not None:
            raise ValueError(f"stop: stop strings need the output as text; {self.text_unavailable}")
        ids = encode_prompt(self.tokenizer, prompt)
        params.validate(self.vocab_size)
        check_prompt(ids, None, self.vocab_size, self.max_model_len)
        rid = f"req-{next(self._ids)}"
        # Compiles the constraint, if any (cached by constraint; ValueError naming its field).
        self.scheduler.add_request(rid, ids, params)
        detok = None
        if self.tokenizer is not None and self.text_unavailable is None and (params.stop or stream):
            # Stop strings need the text as it grows; otherwise it is decoded once at the end.
            detok = IncrementalDetokenizer(
                self.tokenizer,
                params.stop,
                params.include_stop_str_in_output,
                params.skip_special_tokens,
                params.min_new_tokens,
            )
        self._pending[rid] = _Pending(ids, params, detok, [], [], [], chunks=[] if stream else None)
        return rid

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Generate for one prompt, yielding its text piece by piece as it is decoded.

        Runs the engine until the request ends, so nothing else may be in flight; closing the
        iterator early aborts the request.
        """
        if self.text_unavailable is not None:
            raise ValueError(f"stream: text is unavailable; {self.text_unavailable}")
        if self._pending:
            raise RuntimeError("stream: other requests are unfinished; finish them first")
        rid = self.submit(prompt, params, stream=True)
        pending = self._pending[rid]
        assert pending.chunks is not None
        try:
            while rid in self._pending:
                self.step()
                if pending.chunks:
                    yield "".join(pending.chunks)
                    pending.chunks.clear()
        finally:
            if rid in self._pending:
                self.abort(rid)

    def abort(self, rid: str) -> RequestOutput | None:
        """Stop a request; returns what it had produced, or None if it was unknown."""
        if rid not in self._pending:
            return None
        self.scheduler.abort(rid)
        return self._finish(rid, "abort", None)

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the requests that finished in it."""
        return [out for ev in self.scheduler.step() if (out := self._on_event(ev)) is not None]

    def has_unfinished(self) -> bool:
        return bool(self._pending)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list; outputs come back in the prompts' order.

        A prompt is a string, a list of token ids, or a chat (a list of {"role", "content"}).
        """
        batch = _as_prompt_list(prompts)
        if isinstance(sampling_params, Sequence):
            if len(sampling_params) != len(batch):
                raise ValueError("sampling_params: need one per prompt")
            params = list(sampling_params)
        else:
            params = [sampling_params or SamplingParams()] * len(batch)
        rids: list[str] = []
        try:
            for prompt, p in zip(batch, params, strict=True):
                rids.append(self.submit(prompt, p))
        except ValueError:
            for rid in rids:
                self.abort(rid)
            raise
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(rids), desc="Generating", disable=not use_tqdm) as bar:
            while len(done) < len(rids):
                for out in self.step():
                    done[out.rid] = out
                    bar.update(1)
        return [done[rid] for rid in rids]

    def _on_event(self, ev: TokenOut) -> RequestOutput | None:
        pending = self._pending.get(ev.rid)
        if pending is None:
            return None
        pending.token_ids.append(ev.token_id)
        pending.cached_tokens = ev.cached_tokens
        if ev.logprob is not None:
            pending.logprobs.append(ev.logprob)
        if ev.top is not None:
            pending.top_logprobs.append(ev.top)
        if pending.detok is not None:
            text = pending.detok.add([ev.token_id])
            if pending.chunks is not None and text:
                pending.chunks.append(text)
            if pending.detok.matched_stop is not None and ev.finish_reason is None:
                self.scheduler.abort(ev.rid)
                return self._finish(ev.rid, "stop", pending.detok.matched_stop)
        if ev.finish_reason is not None:
            return self._finish(ev.rid, ev.finish_reason, ev.matched_stop)
        return None

    def _finish(self, rid: str, reason: FinishReason, matched: int | str | None) -> RequestOutput:
        p = self._pending.pop(rid)
        text = None
        if p.detok is not None:
            tail = p.detok.flush()
            if p.chunks is not None and tail:
                p.chunks.append(tail)
            text = p.detok.text
            if p.detok.matched_stop is not None:
                reason, matched = "stop", p.detok.matched_stop
        elif self.tokenizer is not None and self.text_unavailable is None:
            text = self.tokenizer.decode(p.token_ids, p.params.skip_special_tokens)
        return RequestOutput(
            rid=rid,
            prompt_token_ids=p.prompt_ids,
            token_ids=p.token_ids,
            text=text,
            finish_reason=reason,
            matched_stop=matched,
            logprobs=p.logprobs if p.params.logprobs else None,
            top_logprobs=p.top_logprobs if p.params.top_logprobs else None,
            cached_tokens=p.cached_tokens,
        )


def _text_unavailable(name: str, tok: Tokenizer | None, vocab_size: int) -> str | None:
    """Why `name`'s outputs cannot be decoded by `tok`, or None. A model without a tokenizer of
    its own (a preset) borrows the demo tokenizer to encode text prompts, but most of the ids it
    generates lie beyond the demo's vocabulary, which would decode to an empty or partial text."""
    if tok is None:
        return f"{name} has no tokenizer"
    demo = Path(str(getattr(tok, "name_or_path", ""))).resolve() == DEMO_DIR.resolve()
    if demo and len(tok) < vocab_size:
        return (
            f"{name} has no tokenizer of its own (the demo tokenizer encodes text prompts, but "
            f"knows only {len(tok)} of its {vocab_size} token ids)"
        )
    return None


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if not items:
        raise ValueError("prompts: empty list")
    if all(isinstance(t, int) for t in items) or all(isinstance(m, dict) for m in items):
        return [items]  # type: ignore[list-item]
    return items  # type: ignore[return-value]
