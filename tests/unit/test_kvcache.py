"""The KV page allocator and pool: bookkeeping, invariant checks, memory arithmetic."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from minisgl.kvcache.allocator import PageAllocator
from minisgl.kvcache.pool import KVPool

# ----- PageAllocator -----------------------------------------------------------------------


def test_alloc_hands_out_distinct_pages_in_range() -> None:
    alloc = PageAllocator(10)
    assert alloc.num_free == 10
    a = alloc.alloc(3)
    b = alloc.alloc(7)
    assert len(a) == 3 and len(b) == 7
    assert sorted(a + b) == list(range(10))
    assert alloc.num_free == 0
    alloc.check(10)


def test_alloc_zero_and_too_many() -> None:
    alloc = PageAllocator(4)
    assert alloc.alloc(0) == []
    taken = alloc.alloc(3)
    with pytest.raises(MemoryError):
        alloc.alloc(2)
    assert alloc.num_free == 1  # a failed alloc takes nothing
    alloc.check(len(taken))


def test_free_returns_pages_for_reuse() -> None:
    alloc = PageAllocator(4)
    first = alloc.alloc(4)
    alloc.free(first[:2])
    assert alloc.num_free == 2
    again = alloc.alloc(2)
    assert sorted(again) == sorted(first[:2])
    alloc.free(again + first[2:])
    assert alloc.num_free == 4
    alloc.check(0)


def test_double_free_of_everything_raises_in_free() -> None:
    alloc = PageAllocator(3)
    pages = alloc.alloc(3)
    alloc.free(pages)
    with pytest.raises(AssertionError):
        alloc.free(pages[:1])


def test_double_free_while_other_pages_are_in_use_raises_in_free() -> None:
    alloc = PageAllocator(8)
    pages = alloc.alloc(4)
    alloc.free(pages[:1])
    with pytest.raises(AssertionError, match="not in use"):
        alloc.free(pages[:1])
    alloc.check(3)


def test_freeing_a_page_never_handed_out_raises() -> None:
    alloc = PageAllocator(8)
    alloc.alloc(2)
    with pytest.raises(AssertionError, match="not in use"):
        alloc.free([8])
    with pytest.raises(AssertionError, match="not in use"):
        alloc.free([alloc._free[0]])


def test_leak_is_caught_by_check() -> None:
    alloc = PageAllocator(8)
    pages = alloc.alloc(5)
    alloc.free(pages[:2])
    alloc.check(3)
    with pytest.raises(AssertionError, match="leak"):
        alloc.check(2)  # one page was dropped without being freed
    with pytest.raises(AssertionError):
        alloc.check(4)  # or counted twice


class AllocatorMachine(RuleBasedStateMachine):
    """Random alloc/free sequences against a model of which pages the callers hold."""

    holdings = Bundle("holdings")

    def __init__(self) -> None:
        super().__init__()
        self.total = 13
        self.alloc = PageAllocator(self.total)
        self.held: dict[int, list[int]] = {}
        self.next_id = 0

    @rule(target=holdings, n=st.integers(0, 8))
    def take(self, n: int) -> int:
        if n > self.alloc.num_free:
            before = self.alloc.num_free
            with pytest.raises(MemoryError):
                self.alloc.alloc(n)
            assert self.alloc.num_free == before
            pages: list[int] = []
        else:
            pages = self.alloc.alloc(n)
            assert len(pages) == n
        self.next_id += 1
        self.held[self.next_id] = pages
        return self.next_id

    @rule(holding=holdings)
    def give_back(self, holding: int) -> None:
        pages = self.held.pop(holding, None)
        if pages is not None:
            self.alloc.free(pages)

    @rule(holding=holdings, data=st.data())
    def give_back_some(self, holding: int, data: st.DataObject) -> None:
        pages = self.held.get(holding)
        if not pages:
            return
        k = data.draw(st.integers(0, len(pages)))
        self.alloc.free(pages[:k])
        self.held[holding] = pages[k:]

    @invariant()
    def consistent(self) -> None:
        in_use = [p for pages in self.held.values() for p in pages]
        assert len(set(in_use)) == len(in_use), "a page handed out twice"
        assert all(0 <= p < self.total for p in in_use)
        assert self.alloc.num_free + len(in_use) == self.total
        self.alloc.check(len(in_use))


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


@settings(max_examples=100, deadline=None)
@given(
    total=st.integers(1, 40),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 45), st.integers(0, 10**6)), max_size=50),
)
def test_free_plus_in_use_is_total(total: int, ops: list[tuple[bool, int, int]]) -> None:
    alloc = PageAllocator(total)
    held: list[int] = []
    for is_alloc, n, pick in ops:
        if is_alloc:
            if n <= alloc.num_free:
                held += alloc.alloc(n)
            else:
                with pytest.raises(MemoryError):
                    alloc.alloc(n)
        elif held:
            k = pick % (len(held) + 1)
            start = pick % len(held)
            chunk = (held[start:] + held[:start])[:k]
            held = [p for p in held if p not in chunk]
            alloc.free(chunk)
        assert alloc.num_free + len(held) == total
        assert len(set(held)) == len(held)
        alloc.check(len(held))


# ----- KVPool ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layers", "page", "heads", "dim", "dtype", "expected"),
    [
        (2, 16, 2, 32, torch.float32, 2 * 2 * 16 * 2 * 32 * 4),
        (2, 16, 2, 32, torch.bfloat16, 2 * 2 * 16 * 2 * 32 * 2),
        (1, 1, 1, 1, torch.float16, 4),
        # Llama-3.1-8B in bf16 at page size 16: 32 layers x 8 KV heads x 128 dims = 2 MiB.
        (32, 16, 8, 128, torch.bfloat16, 2 * 2**20),
    ],
)
def test_bytes_per_page(
    layers: int, page: int, heads: int, dim: int, dtype: torch.dtype, expected: int
) -> None:
    assert KVPool.bytes_per_page(layers, page, heads, dim, dtype) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_allocates_what_bytes_per_page_promises(dtype: torch.dtype) -> None:
    layers, pages, page, heads, dim = 3, 5, 4, 2, 8
    pool = KVPool(layers, pages, page, heads, dim, dtype, torch.device("cpu"))
    assert len(pool.k_caches) == len(pool.v_caches) == layers
    for buf in pool.k_caches + pool.v_caches:
        # One extra page: the scratch page that padded CUDA-graph rows use.
        assert buf.shape == ((pages + 1) * page, heads, dim) and buf.dtype == dtype
    assert pool.scratch_page == pages
    total = sum(b.numel() * b.element_size() for b in pool.k_caches + pool.v_caches)
    assert total == (pages + 1) * KVPool.bytes_per_page(layers, page, heads, dim, dtype)
    # Every layer has its own storage.
    ptrs = {b.data_ptr() for b in pool.k_caches + pool.v_caches}
    assert len(ptrs) == 2 * layers
