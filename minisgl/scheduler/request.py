"""A request's state as the scheduler tracks it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from minisgl.kvcache.radix import Node
from minisgl.sampling_params import FinishReason, SamplingParams


@dataclass(eq=False)
class Req:
    """One generation request: its tokens, its KV pages and how far its KV is computed.

    `pages[:shared_pages]` belong to the radix cache (locked through `node`); the rest are
    the request's own. Tokens [0, num_computed) have their KV in those pages.
    `matcher` (an xgrammar GrammarMatcher, for a structured-output constraint) has accepted
    every output token read back so far.
    """

    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    stop_ids: frozenset[int]
    max_new_tokens: int
    output_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    shared_pages: int = 0
    node: Node | None = None
    row: int = -1
    num_computed: int = 0
    cached_tokens: int = -1  # prompt tokens reused at first admission; -1 until admitted
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    matched_stop: int | None = None
    matcher: Any = None

    @property
    def seq_len(self) -> int:
        """Tokens known so far: prompt plus output."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def resolved_len(self) -> int:
        """Tokens whose ids the host knows: the newest outputs may still be placeholders (< 0)
        for ids sampled on the GPU and not yet read back."""
        n = len(self.output_ids)
        while n and self.output_ids[n - 1] < 0:
            n -= 1
        return len(self.prompt_ids) + n

    @property
    def is_decoding(self) -> bool:
        """Every known token but the newest has its KV: the next step computes one token."""
        return self.num_computed == self.seq_len - 1

    @property
    def remaining_new_tokens(self) -> int:
        return self.max_new_tokens - len(self.output_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end) of prompt + output."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        return (self.prompt_ids[start:] if start < n else []) + self.output_ids[
            max(start - n, 0) : end - n
        ]
