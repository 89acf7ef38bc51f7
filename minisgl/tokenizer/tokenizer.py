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
    """AutoTokenizer for a checkpoint directory or a .gguf file (transformers builds a fast
    tokenizer, with its chat template, from the GGUF metadata); offline: never reaches a hub."""
    from transformers import AutoTokenizer

    if path.suffix == ".gguf" and path.is_file():
        tok: Any = AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
    else:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return tok  # type: ignore[no-any-return]


def tokenizer_for(source: ModelSource, override: str | None = None) -> Tokenizer | None:
    """`override` (--tokenizer: a directory or .gguf file) if given, else the model's
    tokenizer (a GGUF checkpoint's from the file); for a model without one (a preset), the
    demo tokenizer when its ids fit the model's vocabulary, else None (token-id prompts only)."""
    if override is not None:
        return load_tokenizer(Path(override))
    if source.gguf_file is not None:
        return load_tokenizer(source.gguf_file)
    if source.tokenizer_dir is not None:
        return load_tokenizer(source.tokenizer_dir)
    demo = load_tokenizer(DEMO_DIR)
    if len(demo) <= source.config.vocab_size:
        if len(demo) < source.config.vocab_size:
            log.warning(
                "%s has no tokenizer; the demo tokenizer encodes text prompts, but knows only "
                "%d of its %d token ids: output text is unavailable (empty or partial over "
                "gRPC), read the token ids",
                source.name,
                len(demo),
                source.config.vocab_size,
            )
        else:
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


def check_prompt(
    ids: Sequence[int],
    max_new_tokens: int | None,
    vocab_size: int,
    max_model_len: int,
    field: str = "prompt",
) -> None:
    """Check a prompt's token ids, once they are known; ValueError naming the field.

    The one check of the ids' range and of the context length, for the server (the tokenizer
    worker) and the offline API (`LLM.submit`). `max_new_tokens`: the number the client asked
    for, which must fit in the context with the prompt; None when generation may stop at the
    context length instead. `field` names the prompt in the message ("prompt.token_ids" for a
    gRPC token-id prompt).
    """
    if not ids:
        raise ValueError(f"{field}: must contain at least one token")
    if min(ids) < 0 or max(ids) >= vocab_size:
        bad = next(t for t in ids if not 0 <= t < vocab_size)
        raise ValueError(f"{field}: id {bad} is not in the vocabulary [0, {vocab_size})")
    if len(ids) >= max_model_len:
        raise ValueError(
            f"{field}: {len(ids)} tokens reach the context length {max_model_len}; "
            "no room to generate"
        )
    if max_new_tokens is not None and len(ids) + max_new_tokens > max_model_len:
        raise ValueError(
            f"stopping.max_new_tokens: prompt ({len(ids)} tokens) + max_new_tokens "
            f"({max_new_tokens}) exceed the context length {max_model_len}"
        )


class StopStrings:
    """An Aho-Corasick automaton over a request's stop strings, built once per request.

    A state is a node of the trie of the stop strings: the longest suffix of the text fed
    so far that begins some stop string. Feeding a character costs O(1) amortised whatever
    the number of stop strings (`lookups` counts the transitions looked up), so the matcher's
    cost per token depends only on the new text.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if not stops or not all(stops):
            raise ValueError("stop: stop strings must be non-empty")
        self.stops = list(stops)
        self.max_len = max(len(s) for s in self.stops)
        goto: dict[int, int] = {}  # node << 21 | ord(char) -> child node
        get = goto.get
        parent, char, self.depth = [0], [0], [0]
        terminal = [-1]  # per node, the index of a stop string equal to its text, or -1
        for index, s in enumerate(self.stops):
            node = done = 0
            while done < len(s) and (child := get(node << 21 | ord(s[done]))) is not None:
                node, done = child, done + 1
            if done < len(s):  # the rest of s is a new chain of nodes first, first + 1, ...
                first, codes = len(parent), list(map(ord, s[done:]))
                ups = [node, *range(first, first + len(codes) - 1)]
                keys = [u << 21 | c for u, c in zip(ups, codes, strict=True)]
                goto.update(zip(keys, range(first, first + len(codes)), strict=True))
                parent += ups
                char += codes
                self.depth += range(done + 1, len(s) + 1)
                terminal += [-1] * len(codes)
                node = first + len(codes) - 1
            if terminal[node] < 0:
                terminal[node] = index
        # Failure links (to the longest proper suffix that is a node) and, per node, the
        # longest stop string that ends there; shallower nodes first.
        fail = [0] * len(parent)
        match = list(terminal)
        for node in sorted(range(1, len(parent)), key=self.depth.__getitem__):
            if up := parent[node]:
                c, f = char[node], fail[up]
                while (child := get(f << 21 | c)) is None and f:
                    f = fail[f]
                fail[node] = child or 0
            if terminal[node] < 0:
                match[node] = match[fail[node]]
        self._goto, self._fail, self._match = goto, fail, match
        self.lookups = 0

    def step(self, state: int, c: str) -> int:
        """The state after one more character."""
        code = ord(c)
        while True:
            self.lookups += 1
            child = self._goto.get(state << 21 | code)
            if child is not None:
                return child
            if not state:
                return 0
            state = self._fail[state]

    def feed(self, state: int, text: str) -> int:
        for c in text:
            state = self.step(state, c)
        return state

    def search(self, state: int, text: str, offset: int) -> tuple[int, tuple[int, str] | None]:
        """Feed `text` (which starts at character `offset`); the new state and the earliest
        stop string that ends in it as (start, stop), the shortest of those that start there.
        A state that represents text before `offset` lets matches start there too."""
        best: tuple[int, str] | None = None
        for k, c in enumerate(text):
            state = self.step(state, c)
            end = offset + k + 1
            if best is not None and end - self.max_len >= best[0]:
                break  # a later match cannot start earlier
            found = self._match[state]
            if found >= 0:
                stop = self.stops[found]
                if best is None or end - len(stop) < best[0]:
                    best = (end - len(stop), stop)
        return state, best

    def fit(self, state: int, limit: int) -> int:
        """The longest suffix of `state`'s text that begins a stop string and has at most
        `limit` characters."""
        while self.depth[state] > limit:
            state = self._fail[state]
        return state


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a UTF-8 character.

    Stop strings are matched on the decoded text once `min_new_tokens` tokens have been
    fed, never in text already returned; when one matches, the text ends
    there (including the stop string only if asked) and `matched_stop` is set. The earliest
    match wins, the shortest of those that start at the same character. A tail of the text
    that could be the start of a stop string (at most the longest stop string less one
    character) is held back until it is known not to be; holding starts one token before
    matching does. Matching runs a `StopStrings` automaton over the new text only, so its cost
    per token does not grow with the number of stop strings.
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
        self.matched_stop: str | None = None
        self.automaton = StopStrings(self.stop) if self.stop else None
        # Automaton states: `_searching` over the text a stop string may still start in
        # (from the first character not yet known to start none), `_holding` over the text
        # not yet returned. They differ only around min_new_tokens, where holding starts.
        self._searching = 0
        self._holding = 0
        self._searched = 0  # stop strings cannot start before this character
        self._rescan = False  # True: text from _searched on has not been searched yet

    def add(self, token_ids: Sequence[int]) -> str:
        """Feed new token ids; return the text that is now safe to emit."""
        if self.matched_stop is not None:
            return ""
        self.ids.extend(token_ids)
        start = len(self.text)
        if not self._decode(final=False):
            return ""  # an incomplete UTF-8 sequence: wait for more tokens
        held = self._match_stop(start)
        if self.matched_stop is not None:
            return self._emit(len(self.text))
        return self._emit(len(self.text) - held)

    def flush(self) -> str:
        """At the end of a request: everything not yet returned, undecodable bytes included."""
        if self.matched_stop is None and self._read < len(self.ids):
            start = len(self.text)
            self._decode(final=True)
            self._match_stop(start)
        self._holding = 0
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

    def _match_stop(self, start: int) -> int:
        """Match the text decoded from character `start` on; return how many characters at
        its end to hold back because they could begin a stop string."""
        ac = self.automaton
        if ac is None or len(self.ids) < self.min_new_tokens - 1:
            self._searching = self._holding = 0
            self._searched = len(self.text)
            return 0
        new = self.text[start:]
        active = len(self.ids) >= self.min_new_tokens
        if not active:  # hold back, but no match may start yet
            self._searching, self._searched = 0, len(self.text)
            holding = ac.feed(self._holding, new)
        else:
            if self._rescan:  # the held-back tail was decoded before matching began
                self._searching, hit = ac.search(0, self.text[self._searched :], self._searched)
                holding = self._searching
            else:
                same = self._holding == self._searching
                self._searching, hit = ac.search(self._searching, new, start)
                holding = self._searching if same else ac.feed(self._holding, new)
            self._rescan = False
            if hit is not None:
                at, stop = hit
                self.text = self.text[: at + (len(stop) if self.include_stop else 0)]
                self.matched_stop = stop
                return 0
        self._holding = ac.fit(holding, min(ac.max_len - 1, len(self.text) - self._sent))
        held = ac.depth[self._holding]
        if active:  # a stop string can only start in the held-back tail
            self._rescan = len(self.text) - held < self._searched
            self._searched = len(self.text) - held
            self._searching = self._holding
        return held

    def _emit(self, end: int) -> str:
        if end <= self._sent:
            return ""
        delta = self.text[self._sent : end]
        self._sent = end
        return delta
