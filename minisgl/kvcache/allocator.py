"""Hands out KV-cache pages from a fixed pool."""

from __future__ import annotations


class PageAllocator:
    """A free list of page ids 0..num_pages-1; every page is either free or owned by a caller."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._in_use = bytearray(num_pages)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        """Take `n` pages; raises MemoryError if fewer are free (callers check first)."""
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV pages, {len(self._free)} free")
        if n == 0:
            return []
        taken = self._free[-n:]
        del self._free[-n:]
        for p in taken:
            self._in_use[p] = 1
        return taken

    def free(self, pages: list[int]) -> None:
        """Return pages to the pool; raises AssertionError for a page not handed out."""
        for p in pages:
            if not 0 <= p < self.num_pages or not self._in_use[p]:
                raise AssertionError(f"KV page {p} freed but not in use")
            self._in_use[p] = 0
        self._free.extend(pages)

    def check(self, pages_in_use: int) -> None:
        """Invariant: free + in use == total, and no page listed twice."""
        if len(set(self._free)) != len(self._free):
            raise AssertionError("a KV page is in the free list twice")
        if sum(self._in_use) != self.num_pages - len(self._free):
            raise AssertionError("KV page ownership flags out of sync")
        if self.num_free + pages_in_use != self.num_pages:
            raise AssertionError(
                f"KV pages leaked: free {self.num_free} + in use {pages_in_use} "
                f"!= total {self.num_pages}"
            )
