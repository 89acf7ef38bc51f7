"""Per-request sampling and stopping options (no torch here: the frontend uses this too)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]
"""Why a request ended: a stop token or stop string matched ("stop"), max_new_tokens or the
context length was reached ("length"), or its caller aborted it ("abort")."""


GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this (0 included) pick the most likely token: dividing logits by a
tiny temperature overflows float32 (1e-40 gives inf, then NaN probabilities)."""


@dataclass
class SamplingParams:
    """How to pick each token and when to stop.

    temperature 0 (or anything below GREEDY_TEMPERATURE, 1e-5) means greedy. top_k <= 0 (or
    -1) disables top-k; top_p 1.0 and min_p 0.0 disable theirs. repetition_penalty (HF style,
    > 1 discourages) applies to prompt and output tokens; presence and frequency penalties
    (OpenAI style) to output tokens only.
    seed makes sampling reproducible regardless of what else is in the batch.

    Structured output (at most one of these): json_schema (a JSON schema, as a string),
    json_object (any JSON object), regex, grammar (EBNF as xgrammar takes it), choice (exactly
    one of the given strings). Each step masks the tokens the constraint forbids; the request
    ends with finish reason "stop" once the constraint is satisfied and allows nothing more,
    or with "length" at max_new_tokens, when the output may be incomplete (not valid yet).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    skip_special_tokens: bool = True
    json_schema: str | None = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def constraint(self) -> tuple[str, str] | None:
        """(field name, text) of the structured-output constraint, or None: the key of its
        compiled grammar (choice as its JSON list, json_object as "")."""
        if self.json_schema is not None:
            return ("json_schema", self.json_schema)
        if self.json_object:
            return ("json_object", "")
        if self.regex is not None:
            return ("regex", self.regex)
        if self.grammar is not None:
            return ("grammar", self.grammar)
        if self.choice is not None:
            return ("choice", json.dumps(self.choice))
        return None

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError naming the first invalid field."""

        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name}: {why} (got {getattr(self, name)!r})")

        def finite(name: str) -> None:
            if not math.isfinite(getattr(self, name)):
                raise bad(name, "must be a finite number")

        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            finite(name)
        for name in ("presence_penalty", "frequency_penalty"):
            finite(name)
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < -1:
            raise bad("top_k", "must be -1 (disabled), 0 (disabled) or positive")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be >= 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise bad("min_new_tokens", "must be in [0, max_new_tokens]")
        if self.top_logprobs < 0 or self.top_logprobs > vocab_size:
            raise bad("top_logprobs", f"must be in [0, {vocab_size}]")
        if any(not 0 <= t < vocab_size for t in self.stop_token_ids):
            raise bad("stop_token_ids", f"ids must be in [0, {vocab_size})")
        if any(not s for s in self.stop):
            raise bad("stop", "stop strings must be non-empty")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise bad("seed", "must be in [0, 2**63)")
        self._validate_constraint(bad)

    def _validate_constraint(self, bad: Callable[[str, str], ValueError]) -> None:
        """The constraint's shape; whether it compiles is checked where it is compiled."""
        given = [
            name
            for name in ("json_schema", "json_object", "regex", "grammar", "choice")
            if getattr(self, name) not in (None, False)
        ]
        if len(given) > 1:
            raise ValueError(f"{given[1]}: only one constraint per request (also got {given[0]})")
        for name in ("json_schema", "regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise bad(name, "must be a non-empty string")
        if self.json_schema is not None:
            try:
                schema = json.loads(self.json_schema)
            except ValueError as e:
                raise ValueError(f"json_schema: not valid JSON: {e}") from None
            if not isinstance(schema, dict):
                raise bad("json_schema", "must be a JSON object")
        if self.choice is not None and (
            not self.choice or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise bad("choice", "must be a non-empty list of non-empty strings")
        if given and self.min_new_tokens:
            raise bad("min_new_tokens", f"must be 0 with a constraint ({given[0]})")
