"""Loading HF tokenizers, turning prompts into token ids, and incremental detokenization."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from minisgl.models.source import DEMO_DIR, ModelSource

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    """The subset of a transformers tokenizer that minisgl uses."""

    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def __len__(self) -> int: ...


ChatMessage = dict[str, str]
Prompt = str | list[int] | list[ChatMessage]


def load_tokenizer(path: Path) -> Tokenizer:
    """AutoTokenizer for a checkpoint directory (offline: never reaches a hub)."""
    from transformers import AutoTokenizer

    tok: Any = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return tok  # type: ignore[no-any-return]


def tokenizer_for(source: ModelSource) -> Tokenizer | None:
    """The model's tokenizer; for a model without one (a preset), the demo tokenizer when
    its ids fit the model's vocabulary, else None (token-id prompts only)."""
    if source.tokenizer_dir is not None:
        return load_tokenizer(source.tokenizer_dir)
    demo = load_tokenizer(DEMO_DIR)
    if len(demo) <= source.config.vocab_size:
        log.warning("%s has no tokenizer; using the demo tokenizer for text", source.name)
        return demo
    return None


def encode_prompt(tok: Tokenizer | None, prompt: Prompt) -> list[int]:
    """Token ids of a text prompt, a token-id prompt or a chat conversation."""
    if isinstance(prompt, str):
        if tok is None:
            raise ValueError("prompt: this model has no tokenizer; pass token ids")
        return list(tok.encode(prompt))
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [int(t) for t in prompt]  # type: ignore[arg-type]
    if all(isinstance(m, dict) for m in prompt):
        if tok is None:
            raise ValueError("prompt: this model has no tokenizer for chat messages")
        for i, m in enumerate(prompt):
            assert isinstance(m, dict)
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"prompt: message {i} needs string 'role' and 'content'")
        text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return list(tok.encode(text, add_special_tokens=False))
    raise ValueError("prompt: must be a string, a list of token ids or a list of chat messages")


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a UTF-8 character.

    Stop strings are matched on the decoded text once `min_new_tokens` tokens have been
    fed; when one matches, the text ends there (including the stop string only if asked)
    and `matched_stop` is set. A tail of the text that could be the start of a stop string
    is held back until it is known not to be.
    """

    def __init__(
        self,
        tok: Tokenizer,
        stop: Sequence[str] = (),
        include_stop: bool = False,
        skip_special_tokens: bool = True,
        min_new_tokens: int = 0,
    ) -> None:
        self.tok = tok
        self.stop = list(stop)
        self.include_stop = include_stop
        self.skip_special = skip_special_tokens
        self.min_new_tokens = min_new_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # tokens before this are in self.text
        self.text = ""
        self._sent = 0  # characters of self.text already returned
        self._searched = 0  # stop strings cannot start before this character
        self.matched_stop: str | None = None

    def add(self, token_ids: Sequence[int]) -> str:
        """Feed new token ids; return the text that is now safe to emit."""
        if self.matched_stop is not None:
            return ""
        self.ids.extend(token_ids)
        if not self._decode(final=False):
            return ""  # an incomplete UTF-8 sequence: wait for more tokens
        self._match_stop()
        if self.matched_stop is not None:
            return self._emit(len(self.text))
        return self._emit(len(self.text) - self._possible_stop_prefix())

    def flush(self) -> str:
        """At the end of a request: everything not yet returned, undecodable bytes included."""
        if self.matched_stop is None and self._read < len(self.ids):
            self._decode(final=True)
            self._match_stop()
        return self._emit(len(self.text))

    def _decode(self, final: bool) -> bool:
        """Append the text of the tokens not yet decoded; False if they end mid-character."""
        before = self.tok.decode(self.ids[self._prefix : self._read], self.skip_special)
        window = self.tok.decode(self.ids[self._prefix :], self.skip_special)
        if window.endswith("\ufffd") and not final:
            return False
        self.text += window[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        return True

    def _match_stop(self) -> None:
        if not self.stop or len(self.ids) < self.min_new_tokens:
            self._searched = len(self.text)
            return
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, self._searched)) >= 0]
        if hits:
            i, s = min(hits)
            self.text = self.text[: i + (len(s) if self.include_stop else 0)]
            self.matched_stop = s
        else:
            self._searched = len(self.text) - self._possible_stop_prefix()

    def _possible_stop_prefix(self) -> int:
        """Length of the longest tail of the unsent text that begins some stop string."""
        if not self.stop or len(self.ids) < self.min_new_tokens - 1:
            return 0
        tail = self.text[self._sent :]
        for n in range(min(len(tail), max(len(s) for s in self.stop) - 1), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.stop):
                return n
        return 0

    def _emit(self, end: int) -> str:
        if end <= self._sent:
            return ""
        delta = self.text[self._sent : end]
        self._sent = end
        return delta
