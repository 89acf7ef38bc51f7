"""IncrementalDetokenizer with the demo byte-level BPE tokenizer: streaming text equals the
full decode, multi-byte characters are never split, stop strings end the text correctly."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from minisgl.models.source import DEMO_DIR
from minisgl.tokenizer.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(DEMO_DIR)


_TOKENIZER: list[Tokenizer] = []


def demo_tokenizer() -> Tokenizer:
    """For hypothesis tests (function-scoped fixtures do not mix with @given)."""
    if not _TOKENIZER:
        _TOKENIZER.append(load_tokenizer(DEMO_DIR))
    return _TOKENIZER[0]


def encode(tok: Tokenizer, *pieces: str) -> list[int]:
    """Ids of the pieces encoded separately, so that token boundaries fall between them."""
    return [i for piece in pieces for i in tok.encode(piece, add_special_tokens=False)]


def stream(detok: IncrementalDetokenizer, ids: Sequence[int]) -> list[str]:
    """Feed ids one at a time; the deltas, then the flush as the last element."""
    return [detok.add([i]) for i in ids] + [detok.flush()]


TEXTS = [
    "Hello, world!",
    "café naïve résumé, Ångström, Dvořák",
    "日本語のテキストと中文混合",
    "emoji 🎉🚀 and a flag 🇯🇵 and a family 👨\u200d👩\u200d👧",
    "mixed: ñ → 東京 🙂 ok\nnew line\ttab",
    "  leading spaces and trailing  ",
    "🙂",
]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_deltas_equal_the_full_decode(tok: Tokenizer, text: str) -> None:
    ids = encode(tok, text)
    full = tok.decode(ids)
    assert full == text  # byte-level BPE round-trips
    detok = IncrementalDetokenizer(tok)
    deltas = stream(detok, ids)
    assert "".join(deltas) == full
    assert detok.text == full
    assert not any(REPLACEMENT in d for d in deltas)
    assert detok.matched_stop is None


def test_multibyte_characters_are_held_until_complete(tok: Tokenizer) -> None:
    ids = encode(tok, "日本")
    assert len(ids) > 2  # the characters span several byte tokens
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add([i]) for i in ids]
    assert [d for d in deltas if d] == ["日", "本"]
    assert deltas[0] == ""


def test_several_ids_at_once(tok: Tokenizer) -> None:
    text = TEXTS[3]
    ids = encode(tok, text)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(ids[i : i + 3]) for i in range(0, len(ids), 3)] + [detok.flush()]
    assert "".join(deltas) == text


def test_special_tokens_skipped_or_kept(tok: Tokenizer) -> None:
    ids = [*encode(tok, "hi"), 2, *encode(tok, " there")]  # 2 = <|im_end|>
    skipped = IncrementalDetokenizer(tok)
    assert "".join(stream(skipped, ids)) == "hi there"
    kept = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert "".join(stream(kept, ids)) == "hi<|im_end|> there"


def test_a_real_replacement_character_at_the_end_is_not_lost(tok: Tokenizer) -> None:
    """Regression: a text that really ends in U+FFFD must not be swallowed.

    add() waits while the decoded window ends in U+FFFD (an incomplete UTF-8 sequence), and
    flush() only emits text already decoded, so a genuine trailing U+FFFD - or anything fed
    in that last call - vanishes: text 'ok \\ufffd' streams as 'ok '.
    """
    text = f"ok {REPLACEMENT}"
    ids = encode(tok, text)
    assert tok.decode(ids) == text
    detok = IncrementalDetokenizer(tok)
    assert "".join(stream(detok, ids)) == text


def test_flush_keeps_text_fed_together_with_an_incomplete_character(tok: Tokenizer) -> None:
    """Regression: ids added in one call that end mid-character (a request cut off by
    max_new_tokens inside an emoji) must not lose the complete text before it."""
    ids = encode(tok, "hello world 日")[:-1]  # the last byte of 日 is missing
    detok = IncrementalDetokenizer(tok)
    text = detok.add(ids) + detok.flush()
    assert text in ("hello world ", "hello world \ufffd"), repr(text)


def test_a_real_replacement_character_inside_the_text_is_kept(tok: Tokenizer) -> None:
    text = f"a{REPLACEMENT}b"
    detok = IncrementalDetokenizer(tok)
    assert "".join(stream(detok, encode(tok, text))) == text


# Characters from several scripts and widths (U+FFFD itself is covered separately above).
CHARS = st.characters(
    codec="utf-8",
    exclude_characters=REPLACEMENT,
    exclude_categories=["Cs"],
)
ALPHABET = st.one_of(
    st.sampled_from(list("ab xyz.,\n")),
    st.sampled_from(list("éüñçøß")),
    st.sampled_from(list("日本語中文한국")),
    st.sampled_from(["🎉", "🚀", "🙂", "👍🏽"]),
    CHARS,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ALPHABET, max_size=24).map("".join))
@example("👍🏽 日本")
def test_streaming_property(text: str) -> None:
    tok = demo_tokenizer()
    ids = encode(tok, text)
    full = tok.decode(ids)
    detok = IncrementalDetokenizer(tok)
    deltas = stream(detok, ids)
    assert "".join(deltas) == full
    if REPLACEMENT not in full:
        assert not any(REPLACEMENT in d for d in deltas)


# ----- stop strings ------------------------------------------------------------------------


@pytest.mark.parametrize("include_stop", [False, True])
def test_stop_string_spanning_several_tokens(tok: Tokenizer, include_stop: bool) -> None:
    stop = " the end"
    ids = encode(tok, "abc the end xyz and more")
    pieces = [tok.decode([i]) for i in ids]
    assert not any(stop in p for p in pieces)  # no single token holds the stop string
    detok = IncrementalDetokenizer(tok, [stop], include_stop)
    deltas = stream(detok, ids)
    expected = "abc the end" if include_stop else "abc"
    assert detok.matched_stop == stop
    assert detok.text == expected
    assert "".join(deltas) == expected  # nothing past (or of) the stop string was emitted


def test_nothing_is_emitted_after_a_stop(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, ["STOP"])
    deltas = stream(detok, encode(tok, "go go STOP", " later text"))
    assert detok.text == "go go " and "".join(deltas) == "go go "
    assert detok.add(encode(tok, "even more")) == ""
    assert detok.text == "go go "


def test_earliest_stop_string_wins(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, ["zzz", "\n\n", "bb"])
    deltas = stream(detok, encode(tok, "aa bb cc\n\ndd zzz"))
    assert detok.matched_stop == "bb" and "".join(deltas) == "aa "


def test_stop_string_prefix_is_held_back_then_released(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, ["STOP"])
    emitted = "".join(detok.add([i]) for i in encode(tok, "Hello ", "ST"))
    assert "Hello ".startswith(emitted)  # 'ST' (maybe more) is held back
    assert "S" not in emitted
    emitted += "".join(detok.add([i]) for i in encode(tok, "ART and then more text"))
    assert emitted.startswith("Hello START")  # released once it could not be 'STOP'
    emitted += detok.flush()
    assert emitted == "Hello START and then more text"
    assert detok.matched_stop is None


def test_stop_string_completed_in_a_later_token(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, ["<END>"])
    emitted = ""
    for piece in ("one two ", "<E", "N", "D> three"):
        emitted += detok.add(encode(tok, piece))
        assert "<" not in emitted
    assert detok.matched_stop == "<END>"
    assert emitted + detok.flush() == "one two "


def test_stop_string_with_multibyte_characters(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, ["終わり"], include_stop=True)
    deltas = stream(detok, encode(tok, "物語の終わりです"))
    assert detok.matched_stop == "終わり"
    assert "".join(deltas) == "物語の終わり"


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.lists(st.sampled_from(list("ab c日🙂")), max_size=20).map("".join),
    stop=st.lists(st.sampled_from(list("ab c日🙂")), min_size=1, max_size=3).map("".join),
    include_stop=st.booleans(),
)
def test_stop_property(text: str, stop: str, include_stop: bool) -> None:
    """Streamed output is the text up to the first occurrence of the stop string."""
    tok = demo_tokenizer()
    ids = encode(tok, text)
    full = tok.decode(ids)
    detok = IncrementalDetokenizer(tok, [stop], include_stop)
    emitted = ""
    for i in ids:
        emitted += detok.add([i])
        # Never emit text that a later stop could cut off.
        cut = full.find(stop)
        assert cut < 0 or len(emitted) <= cut + (len(stop) if include_stop else 0)
    emitted += detok.flush()
    at = full.find(stop)
    if at < 0:
        assert emitted == full and detok.matched_stop is None
    else:
        assert emitted == full[: at + (len(stop) if include_stop else 0)]
        assert detok.matched_stop == stop


def test_only_a_possible_stop_prefix_is_held_back(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, stop=["<END>"])
    ids = encode(tok, "hello world")
    deltas = [detok.add([i]) for i in ids]
    # Nothing in "hello world" can begin "<END>", so every character goes out at once.
    assert "".join(deltas) == "hello world"
    assert detok.add(encode(tok, " <E")) == " "  # "<E" might begin the stop string
    assert detok.add(encode(tok, "x")) == "<Ex"


def test_stop_strings_wait_for_min_new_tokens(tok: Tokenizer) -> None:
    ids = encode(tok, "ab STOP cd STOP ef")
    early = IncrementalDetokenizer(tok, stop=["STOP"])
    "".join(stream(early, ids))
    assert early.text == "ab "
    late = IncrementalDetokenizer(tok, stop=["STOP"], min_new_tokens=len(encode(tok, "ab STOP cd")))
    "".join(stream(late, ids))
    assert late.matched_stop == "STOP"
    assert late.text.startswith("ab STOP cd") and not late.text.endswith("ef")


# ----- the stop-string automaton against a brute-force reference ---------------------------


class BruteForceDetokenizer(IncrementalDetokenizer):
    """The reference: every stop string searched with str.find in the text a match may start
    in, and every tail of the unsent text tried against every stop string for the hold-back.
    Its cost per token grows with the number (and length) of the stop strings."""

    def add(self, token_ids: Sequence[int]) -> str:
        if self.matched_stop is not None:
            return ""
        self.ids.extend(token_ids)
        if not self._decode(final=False):
            return ""
        self._brute_match()
        if self.matched_stop is not None:
            return self._emit(len(self.text))
        return self._emit(len(self.text) - self._brute_hold())

    def flush(self) -> str:
        if self.matched_stop is None and self._read < len(self.ids):
            self._decode(final=True)
            self._brute_match()
        return self._emit(len(self.text))

    def _brute_match(self) -> None:
        searched = getattr(self, "_brute_searched", 0)
        if not self.stop or len(self.ids) < self.min_new_tokens:
            self._brute_searched = len(self.text)
            return
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, searched)) >= 0]
        if hits:
            i, s = min(hits)
            self.text = self.text[: i + (len(s) if self.include_stop else 0)]
            self.matched_stop = s
        else:
            self._brute_searched = len(self.text) - self._brute_hold()

    def _brute_hold(self) -> int:
        if not self.stop or len(self.ids) < self.min_new_tokens - 1:
            return 0
        tail = self.text[self._sent :]
        for n in range(min(len(tail), max(len(s) for s in self.stop) - 1), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.stop):
                return n
        return 0


STOP_ALPHABET = list("ab c日🙂")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.lists(st.sampled_from(STOP_ALPHABET), max_size=30).map("".join),
    stops=st.lists(
        st.lists(st.sampled_from(STOP_ALPHABET), min_size=1, max_size=5).map("".join),
        min_size=1,
        max_size=6,
    ),
    include_stop=st.booleans(),
    min_new_tokens=st.integers(0, 12),
    chunks=st.lists(st.integers(1, 4), min_size=1, max_size=8),
)
@example(text="ab cab", stops=["b c", "c"], include_stop=False, min_new_tokens=0, chunks=[1])
@example(text="baa", stops=["b", "baa"], include_stop=False, min_new_tokens=2, chunks=[1])
@example(text="aaab", stops=["aab", "ab", "a" * 3], include_stop=True, min_new_tokens=2, chunks=[2])
def test_automaton_matches_the_brute_force_reference(
    text: str, stops: list[str], include_stop: bool, min_new_tokens: int, chunks: list[int]
) -> None:
    """Same deltas, same final text, same matched stop, for several (overlapping, repeated,
    prefix-sharing) stop strings, tokens fed in groups, and min_new_tokens."""
    tok = demo_tokenizer()
    ids = encode(tok, text)
    fast = IncrementalDetokenizer(tok, stops, include_stop, min_new_tokens=min_new_tokens)
    slow = BruteForceDetokenizer(tok, stops, include_stop, min_new_tokens=min_new_tokens)
    pos, k = 0, 0
    while pos < len(ids):
        group = ids[pos : pos + chunks[k % len(chunks)]]
        pos, k = pos + len(group), k + 1
        assert fast.add(group) == slow.add(group), (pos, fast.text)
        assert fast.matched_stop == slow.matched_stop
    assert fast.flush() == slow.flush()
    assert (fast.text, fast.matched_stop) == (slow.text, slow.matched_stop)


def _adversarial_stops(n: int) -> list[str]:
    """Stop strings that share long prefixes with the text below, so that every one of them
    stays a candidate: a matcher that tries each stop string pays n times for it."""
    return [("ab" * 400)[: 40 + 7 * i] + f"<{i}>" for i in range(n)]


ADVERSARIAL_TEXT = ("ab" * 150 + " the quick brown fox ") * 3


def test_matching_work_per_token_does_not_grow_with_the_stop_strings(tok: Tokenizer) -> None:
    ids = encode(tok, ADVERSARIAL_TEXT)
    work = {}
    for n in (1, 64):
        detok = IncrementalDetokenizer(tok, _adversarial_stops(n))
        text = "".join(detok.add([i]) for i in ids) + detok.flush()
        assert text == ADVERSARIAL_TEXT and detok.matched_stop is None
        assert detok.automaton is not None
        work[n] = detok.automaton.lookups
    # Aho-Corasick: at most two transitions looked up per character, whatever the stop strings.
    assert work[64] <= 2 * len(ADVERSARIAL_TEXT)
    assert work[1] <= 2 * len(ADVERSARIAL_TEXT)


def test_matching_time_per_token_does_not_grow_with_the_stop_strings(tok: Tokenizer) -> None:
    """Wall time, generously: 2,000 stop strings (more than a server accepts) against one."""
    ids = encode(tok, ADVERSARIAL_TEXT)

    def seconds_per_run(stops: list[str]) -> float:
        best = math.inf
        for _ in range(3):
            detok = IncrementalDetokenizer(tok, stops)  # built once per request: not timed
            start = time.perf_counter()
            for i in ids:
                detok.add([i])
            best = min(best, time.perf_counter() - start)
        return best

    one = seconds_per_run(_adversarial_stops(1))
    many = seconds_per_run(_adversarial_stops(2000))
    assert many < 3 * one + 0.05, (many, one)
