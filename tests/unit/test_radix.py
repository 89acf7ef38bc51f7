"""Property tests of the radix cache against a naive model (a dict of cached page prefixes)."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from minisgl.kvcache.allocator import PageAllocator
from minisgl.kvcache.radix import Node, RadixCache

PAGE = 2
TOTAL = 64
# A tiny alphabet so that sequences share prefixes and split nodes often.
seqs = st.lists(st.integers(0, 2), min_size=0, max_size=12)


class RadixMachine(RuleBasedStateMachine):
    """Random inserts, matches, locks, unlocks and evictions; invariants after each."""

    def __init__(self) -> None:
        super().__init__()
        self.alloc = PageAllocator(TOTAL)
        self.cache = RadixCache(PAGE, self.alloc)
        # Naive model: every cached page-aligned prefix -> the page holding its last page.
        self.model: dict[tuple[int, ...], int] = {}
        self.locks: list[tuple[Node, tuple[int, ...]]] = []

    def _aligned(self, seq: list[int]) -> list[int]:
        return seq[: len(seq) // PAGE * PAGE]

    def _model_match(self, seq: list[int]) -> list[int]:
        pages = []
        for end in range(PAGE, len(seq) + 1, PAGE):
            page = self.model.get(tuple(seq[:end]))
            if page is None:
                break
            pages.append(page)
        return pages

    @precondition(lambda self: self.alloc.num_free >= 6)
    @rule(seq=seqs)
    def insert(self, seq: list[int]) -> None:
        seq = self._aligned(seq)
        pages = self.alloc.alloc(len(seq) // PAGE)
        expected = self._model_match(seq)
        tree_pages, _ = self.cache.insert(seq, pages)
        # Already-cached parts keep their pages; the rest take ours.
        assert tree_pages[: len(expected)] == expected
        assert tree_pages[len(expected) :] == pages[len(expected) :]
        for i, page in enumerate(tree_pages):
            self.model[tuple(seq[: (i + 1) * PAGE])] = page

    @rule(seq=seqs)
    def match(self, seq: list[int]) -> None:
        pages, _ = self.cache.match(seq)
        assert pages == self._model_match(seq)
        assert self.cache.match_len(seq) == len(pages) * PAGE

    @rule(seq=seqs)
    def lock(self, seq: list[int]) -> None:
        pages, node = self.cache.match(seq)
        self.cache.lock(node)
        self.locks.append((node, tuple(seq[: len(pages) * PAGE])))

    @precondition(lambda self: self.locks)
    @rule(index=st.integers(0, 100))
    def unlock(self, index: int) -> None:
        node, _ = self.locks.pop(index % len(self.locks))
        self.cache.unlock(node)

    @rule(n=st.integers(0, 20))
    def evict(self, n: int) -> None:
        before = self.cache.evictable_pages
        freed = self.cache.evict(n)
        assert freed >= min(n, before) or freed == before
        # Drop from the model what the tree no longer has; locked prefixes must all survive.
        self.model = {
            k: v for k, v in self.model.items() if self.cache.match_len(list(k)) == len(k)
        }
        for _, prefix in self.locks:
            for end in range(PAGE, len(prefix) + 1, PAGE):
                assert prefix[:end] in self.model, "a locked prefix was evicted"

    @invariant()
    def pages_add_up(self) -> None:
        self.cache.check()
        assert self.alloc.num_free + self.cache.cached_pages == TOTAL
        assert self.cache.cached_pages == len(self.model)
        assert set(self.model.values()).isdisjoint(self.alloc._free)
        assert 0 <= self.cache.locked_pages <= self.cache.cached_pages
        # Prefix-closed: every cached prefix's parent prefix is cached too.
        for key in self.model:
            assert len(key) == PAGE or key[:-PAGE] in self.model


RadixMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestRadixCache = RadixMachine.TestCase


def test_evict_is_lru_and_frees_everything_unlocked() -> None:
    alloc = PageAllocator(8)
    cache = RadixCache(1, alloc)
    cache.insert([1, 2], alloc.alloc(2))
    cache.insert([3, 4], alloc.alloc(2))
    cache.match([1, 2])  # [1, 2] is now the most recently used
    assert cache.evict(1) >= 1
    assert cache.match_len([3, 4]) < 2 and cache.match_len([1, 2]) == 2
    _, node = cache.match([1, 2])
    cache.lock(node)
    cache.reset()
    assert cache.match_len([1, 2]) == 2, "locked entries survive reset"
    cache.unlock(node)
    cache.reset()
    assert cache.cached_pages == 0 and alloc.num_free == 8
    cache.check()


def test_unlock_below_zero_is_caught() -> None:
    alloc = PageAllocator(4)
    cache = RadixCache(1, alloc)
    _, node = cache.insert([1], alloc.alloc(1))
    try:
        cache.unlock(node)
    except AssertionError:
        return
    raise AssertionError("unlocking an unlocked node must raise")
