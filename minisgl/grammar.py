"""Structured output with xgrammar: a request's constraint (SamplingParams.json_schema,
json_object, regex, grammar, choice) compiled for the model's tokenizer, and the token bitmasks
its matchers fill.

xgrammar (which imports torch and transformers) is imported on first use, so processes that
never see a constraint never load it. Compiled grammars are cached by `SamplingParams.constraint`
(the field and its text), so each distinct constraint compiles once per process.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from minisgl.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch
    import xgrammar

#: Compiled grammars kept per compiler (least recently used dropped first).
CACHE_SIZE = 512

#: The longest compiler message passed on to the client.
MAX_MESSAGE = 400

_LOCATION = re.compile(r"^\[[\d:.]+\] \S+?:\d+: (Check failed: \(.*?\) is false: )?")


def compiler_message(e: Exception) -> str:
    """xgrammar's error without its C++ source location, cut to MAX_MESSAGE characters."""
    text = _LOCATION.sub("", str(e).strip()).strip()
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def choice_grammar(choice: Sequence[str]) -> str:
    """EBNF accepting exactly one of `choice` (JSON string escapes are EBNF's too)."""
    import json

    return "root ::= " + " | ".join(json.dumps(c) for c in choice)


#: The character class xgrammar 0.2.9 gives the characters of a string with a minLength or
#: maxLength: it lets raw control characters (U+0000 to U+001F) through, which JSON forbids.
_LENGTH_BOUNDED_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\\r\n]"


def json_grammar(schema: str, strict: bool) -> str:
    """The EBNF of a JSON schema: compact JSON (no free whitespace, which a model could repeat
    forever), the characters of every string valid JSON ones."""
    import xgrammar

    grammar = xgrammar.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=strict)
    return str(grammar).replace(_LENGTH_BOUNDED_CHAR, _JSON_STRING_CHAR)


class GrammarCompiler:
    """Compiles constraints for one tokenizer and vocabulary; caches them by constraint.

    `vocab_size` is the model's (the width of its logits; ids the tokenizer lacks are always
    masked). `stop_ids` end the output once the constraint is satisfied (the model's EOS ids;
    the tokenizer's own when empty). JSON schemas compile in xgrammar's strict mode: an
    object gets no properties but those its schema lists unless its additionalProperties
    allows more (every output still matches the schema).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = list(stop_ids)
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._cache: OrderedDict[tuple[str, str], xgrammar.CompiledGrammar] = OrderedDict()
        self._batch: xgrammar.BatchGrammarMatcher | None = None
        self.compiles = 0  # cache misses, for tests and logs

    @property
    def batch(self) -> xgrammar.BatchGrammarMatcher:
        """Fills many rows of a bitmask on xgrammar's threads (see `fill_bitmask`)."""
        if self._batch is None:
            import xgrammar

            self._batch = xgrammar.BatchGrammarMatcher()
        return self._batch

    def prepare(self) -> None:
        """Import xgrammar and build its view of the vocabulary now, not on first use."""
        if self.tokenizer is not None:
            self._xgr()

    def _xgr(self) -> xgrammar.GrammarCompiler:
        if self._compiler is None:
            import xgrammar

            info = xgrammar.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_ids or None
            )
            self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        return self._compiler

    def compile(self, params: SamplingParams) -> xgrammar.CompiledGrammar | None:
        """The compiled constraint of `params` (None without one); ValueError naming the field
        and the compiler's message if it does not compile."""
        key = params.constraint
        if key is None:
            return None
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        if self.tokenizer is None:
            raise ValueError(f"{key[0]}: constraints need the model's tokenizer; it has none")
        compiler = self._xgr()
        name, text = key
        try:
            if name == "json_schema":
                compiled = compiler.compile_grammar(json_grammar(text, strict=True))
            elif name == "json_object":
                compiled = compiler.compile_grammar(json_grammar('{"type": "object"}', False))
            elif name == "regex":
                compiled = compiler.compile_regex(text)
            elif name == "grammar":
                compiled = compiler.compile_grammar(text)
            else:
                compiled = compiler.compile_grammar(choice_grammar(params.choice or []))
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{name}: does not compile: {compiler_message(e)}") from None
        self.compiles += 1
        self._cache[key] = compiled
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return compiled

    def matcher(self, params: SamplingParams) -> xgrammar.GrammarMatcher | None:
        """A fresh matcher for `params`' constraint (None without one); ValueError as `compile`."""
        compiled = self.compile(params)
        if compiled is None:
            return None
        import xgrammar

        return xgrammar.GrammarMatcher(compiled)


class GrammarSource:
    """The GrammarCompiler of one engine, made from a tokenizer when first needed, or ahead of
    time on a background thread (`prepare`: loading a tokenizer and xgrammar's view of a large
    vocabulary takes seconds, which the first constrained request should not stall the others'
    steps for)."""

    def __init__(
        self, load_tokenizer: Callable[[], Any], vocab_size: int, stop_ids: Sequence[int]
    ) -> None:
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = list(stop_ids)
        self._compiler: GrammarCompiler | None = None
        self._loader: threading.Thread | None = None

    def use_tokenizer(self, tokenizer: Any) -> None:
        """Compile with this (already loaded) tokenizer."""
        self._compiler = GrammarCompiler(tokenizer, self.vocab_size, self.stop_ids)

    def prepare(self) -> None:
        """Start loading on a background thread, unless a compiler exists or is on its way."""
        if self._compiler is None and self._loader is None:
            self._loader = threading.Thread(target=self._load, name="grammar-loader", daemon=True)
            self._loader.start()

    @property
    def loading(self) -> bool:
        return self._loader is not None

    @property
    def loaded(self) -> GrammarCompiler | None:
        """The compiler if it is ready now (never waits)."""
        return None if self._loader is not None else self._compiler

    @property
    def compiler(self) -> GrammarCompiler:
        """The compiler, waiting for a background load or loading it here."""
        if self._loader is not None:
            self._loader.join()
            self._loader = None
        if self._compiler is None:
            self._load()
        assert self._compiler is not None
        return self._compiler

    def _load(self) -> None:
        compiler = GrammarCompiler(self._load_tokenizer(), self.vocab_size, self.stop_ids)
        compiler.prepare()
        self._compiler = compiler


def bitmask_words(vocab_size: int) -> int:
    """int32 words per row of a token bitmask (bit i of word j allows token 32 * j + i)."""
    return (vocab_size + 31) // 32


def fill_bitmask(
    matchers: Sequence[xgrammar.GrammarMatcher | None],
    vocab_size: int,
    batch: xgrammar.BatchGrammarMatcher | None = None,
    pin: bool = False,
) -> torch.Tensor | None:
    """[rows, bitmask_words] int32 host bitmask: each matcher's allowed next tokens in its row,
    every token allowed in rows without one; None when no row has a matcher. With `batch`,
    several rows are filled by its threads at once. `pin`: in pinned memory (CUDA only), so
    that it goes to the GPU without another host copy."""
    rows = [i for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return None
    import torch

    shape = (len(matchers), bitmask_words(vocab_size))
    bitmask = torch.full(shape, -1, dtype=torch.int32, pin_memory=pin)
    present = [m for m in matchers if m is not None]
    if batch is not None and len(rows) > 1:
        batch.batch_fill_next_token_bitmask(present, bitmask, indices=rows)
    else:
        for i, matcher in zip(rows, present, strict=True):
            matcher.fill_next_token_bitmask(bitmask, i)
    return bitmask
