"""KV pages and page-table rows of the running requests, with the prefix cache behind them.

A page is free (in the allocator), cached (owned by the prefix cache) or private to one
running request. Page-table writes are collected here and handed to the engine with the next
step's plan; the page table itself lives on the device, in the ModelRunner.
"""

from __future__ import annotations

from collections.abc import Iterable

from minisgl.kvcache.allocator import PageAllocator
from minisgl.kvcache.prefix import NoPrefixCache, PrefixCache
from minisgl.kvcache.radix import Node, RadixCache
from minisgl.scheduler.request import Req


class KVPages:
    """Hands running requests rows and pages, evicting cached pages when the pool runs short."""

    def __init__(self, num_pages: int, page_size: int, max_rows: int, prefix_cache: bool) -> None:
        self.page_size = page_size
        self.max_rows = max_rows
        self.allocator = PageAllocator(num_pages)
        self.cache: PrefixCache = (
            RadixCache(page_size, self.allocator) if prefix_cache else NoPrefixCache()
        )
        self.free_rows = list(range(max_rows - 1, -1, -1))
        # Page-table entries to write before the next forward: (row, column) -> page. A dict,
        # so a cell written twice between flushes gets its last value (index_put_ with
        # duplicate indices on CUDA would pick one at random).
        self._table_writes: dict[tuple[int, int], int] = {}

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    @property
    def available(self) -> int:
        """Pages that can be handed out now: free ones plus unlocked cached ones."""
        return self.allocator.num_free + self.cache.evictable_pages

    def take_table_writes(self) -> dict[tuple[int, int], int]:
        writes, self._table_writes = self._table_writes, {}
        return writes

    def _take(self, n: int) -> list[int]:
        """n pages, evicting cached ones first if too few are free (caller checked `available`)."""
        short = n - self.allocator.num_free
        if short > 0:
            self.cache.evict(short)
        return self.allocator.alloc(n)

    def _assign(self, req: Req, pages: Iterable[int]) -> None:
        start = len(req.pages)
        for i, p in enumerate(pages):
            self._table_writes[req.row, start + i] = p
            req.pages.append(p)

    def grow(self, req: Req, n: int) -> None:
        """Give `req` n more pages."""
        if n > 0:
            self._assign(req, self._take(n))

    def grow_each(self, reqs: list[Req]) -> None:
        """One more page for each of `reqs`, taken together."""
        if reqs:
            for req, page in zip(reqs, self._take(len(reqs)), strict=True):
                self._assign(req, (page,))

    def match(self, req: Req) -> tuple[list[int], Node | None]:
        """Lock and return the longest cached prefix of the request's tokens (all but the last)."""
        pages, node = self.cache.match(req.token_slice(0, req.seq_len - 1))
        self.cache.lock(node)  # before counting what is evictable
        return pages, node

    def admit(self, req: Req, prefix_pages: list[int], node: Node | None, new_pages: int) -> None:
        """Give `req` a row, the matched prefix (locked by `match`) and `new_pages` pages."""
        req.row = self.free_rows.pop()
        req.pages, req.shared_pages, req.node = [], len(prefix_pages), node
        self._assign(req, prefix_pages)
        req.num_computed = len(prefix_pages) * self.page_size
        self.grow(req, new_pages)

    def cache_prefix(self, req: Req) -> None:
        """Put the request's computed full pages into the prefix cache and lock them for it."""
        full = min(req.num_computed, req.resolved_len) // self.page_size
        if not self.cache.keeps_pages or full <= req.shared_pages:
            return
        tree_pages, node = self.cache.insert(
            req.token_slice(0, full * self.page_size), req.pages[:full]
        )
        for i, (mine, theirs) in enumerate(zip(req.pages[:full], tree_pages, strict=True)):
            if mine != theirs:  # someone cached this part first: use theirs (ours were freed)
                req.pages[i] = theirs
                self._table_writes[req.row, i] = theirs
        self.cache.lock(node)
        self.cache.unlock(req.node)
        req.node, req.shared_pages = node, full

    def release(self, req: Req, cache_it: bool) -> None:
        """Give back the request's pages and row; with cache_it, computed pages are cached."""
        if cache_it:
            self.cache_prefix(req)
        self.cache.unlock(req.node)
        self.allocator.free(req.pages[req.shared_pages :])
        req.pages, req.shared_pages, req.node = [], 0, None
        self.free_rows.append(req.row)
        req.row = -1

    def check(self, running: list[Req], waiting: Iterable[Req]) -> None:
        """Raise AssertionError if pages, rows, locks or the cache are inconsistent."""
        private = sum(len(r.pages) - r.shared_pages for r in running)
        self.cache.check()
        cached = self.cache.cached_pages
        total, free = self.allocator.num_pages, self.allocator.num_free
        if free + cached + private != total:
            raise AssertionError(
                f"KV pages leaked: free {free} + cached {cached} + in use {private} "
                f"!= total {total}"
            )
        self.allocator.check(total - free)
        rows = [r.row for r in running]
        if len(set(rows)) != len(rows) or set(rows) & set(self.free_rows):
            raise AssertionError("page-table rows double-booked")
        if len(rows) + len(self.free_rows) != self.max_rows:
            raise AssertionError("page-table rows leaked")
        if any(r.pages or r.node is not None for r in waiting):
            raise AssertionError("a waiting request holds pages")
