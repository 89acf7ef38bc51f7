"""Radix (prefix) cache: a tree over token ids whose nodes own the KV pages of their tokens.

Keys are page-aligned: a node's key holds a whole number of pages of tokens and its
`pages` list one page id per `page_size` tokens. Children are found by their first page of
tokens. Running requests lock the path to the node they use, so locked pages are never
evicted; unlocked leaves are evicted least-recently-used first when the pool runs short.

With events on (`record_events`), every page the tree takes or frees is recorded as a
BlocksStored / BlocksRemoved event (what smg's KV index reads): a page is a block, named by
a 64-bit hash of its tokens chained with the hash of the page before it, so the same prefix
gets the same hashes on every replica and a block's hash says where it sits.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from array import array
from dataclasses import dataclass, field

import msgspec

from minisgl.kvcache.allocator import PageAllocator


class BlocksStored(msgspec.Struct, tag=True):
    """Consecutive pages the tree took: (hash, tokens) each; `parent` is the hash of the page
    before the first (None: they start at the root)."""

    parent: int | None
    blocks: list[tuple[int, list[int]]]


class BlocksRemoved(msgspec.Struct, tag=True):
    """Pages the tree freed, by hash."""

    hashes: list[int]


CacheEvent = BlocksStored | BlocksRemoved


def block_hash(parent: int | None, tokens: list[int]) -> int:
    """A signed 64-bit hash of a page's tokens and the hash of the page before it."""
    h = hashlib.blake2b(digest_size=8)
    h.update((parent or 0).to_bytes(8, "little", signed=True))
    h.update(array("q", tokens).tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


@dataclass(eq=False)
class Node:
    """A run of tokens and the pages that hold their KV."""

    key: list[int]
    pages: list[int]
    parent: Node | None
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)
    lock_ref: int = 0
    last_used: int = 0
    hashes: list[int] = field(default_factory=list)
    """One block hash per page while events are recorded (else empty)."""


class RadixCache:
    """Shares KV pages between requests with common prefixes; evicts LRU unlocked leaves."""

    keeps_pages = True

    def __init__(self, page_size: int, allocator: PageAllocator) -> None:
        self.page_size = page_size
        self.allocator = allocator
        self.root = Node([], [], None, lock_ref=1)
        self._clock = itertools.count(1)
        self.cached_pages = 0  # pages owned by the tree
        self.locked_pages = 0  # of those, pages on a locked path
        self._events: list[CacheEvent] | None = None  # None: not recording

    def record_events(self) -> None:
        """From now on record the pages the tree takes and frees (`take_events`). Call it
        while the tree is empty: pages cached before have no hashes."""
        if self.cached_pages:
            raise AssertionError("record_events on a radix cache that already holds pages")
        self._events = []

    def take_events(self) -> list[CacheEvent]:
        """The events recorded since the last call, oldest first."""
        if not self._events:
            return []
        events, self._events = self._events, []
        return events

    @property
    def evictable_pages(self) -> int:
        return self.cached_pages - self.locked_pages

    def _child_key(self, ids: list[int], at: int) -> tuple[int, ...]:
        return tuple(ids[at : at + self.page_size])

    def _common_pages(self, key: list[int], ids: list[int], at: int) -> int:
        """How many whole pages of `key` equal ids[at:]."""
        ps, n = self.page_size, 0
        limit = min(len(key), len(ids) - at) // ps
        while n < limit and key[n * ps : (n + 1) * ps] == ids[at + n * ps : at + (n + 1) * ps]:
            n += 1
        return n

    def _split(self, node: Node, num_pages: int) -> Node:
        """Cut `node` after `num_pages` pages; returns the new upper part."""
        cut = num_pages * self.page_size
        assert node.parent is not None
        upper = Node(node.key[:cut], node.pages[:num_pages], node.parent, lock_ref=node.lock_ref)
        upper.last_used = node.last_used
        upper.hashes, node.hashes = node.hashes[:num_pages], node.hashes[num_pages:]
        node.parent.children[self._child_key(node.key, 0)] = upper
        node.key, node.pages, node.parent = node.key[cut:], node.pages[num_pages:], upper
        upper.children[self._child_key(node.key, 0)] = node
        return upper

    def match(self, ids: list[int]) -> tuple[list[int], Node]:
        """Pages of the longest cached page-aligned prefix of `ids`, and the node ending it."""
        node, at, pages = self.root, 0, []
        now = next(self._clock)
        while len(ids) - at >= self.page_size:
            child = node.children.get(self._child_key(ids, at))
            if child is None:
                break
            n = self._common_pages(child.key, ids, at)
            if n * self.page_size < len(child.key):
                child = self._split(child, n)
            child.last_used = now
            pages += child.pages
            at += len(child.key)
            node = child
        return pages, node

    def match_len(self, ids: list[int]) -> int:
        """Length of the cached prefix of `ids`, without touching the tree (for ordering)."""
        node, at = self.root, 0
        while len(ids) - at >= self.page_size:
            child = node.children.get(self._child_key(ids, at))
            if child is None:
                break
            n = self._common_pages(child.key, ids, at)
            at += n * self.page_size
            if n * self.page_size < len(child.key):
                break
            node = child
        return at

    def insert(self, ids: list[int], pages: list[int]) -> tuple[list[int], Node]:
        """Cache `ids` (page-aligned) held in `pages`; the tree takes the pages it lacks.

        Where a part is already cached under other pages, the caller's duplicates go back
        to the allocator. Returns the tree's pages for `ids` and the node ending them.
        """
        ps = self.page_size
        assert len(ids) == len(pages) * ps
        node, at = self.root, 0
        now = next(self._clock)
        out: list[int] = []
        while at < len(ids):
            child = node.children.get(self._child_key(ids, at))
            if child is None:
                first = at // ps
                new = Node(ids[at:], pages[first:], node, last_used=now)
                node.children[self._child_key(ids, at)] = new
                self.cached_pages += len(new.pages)
                self._stored(new)
                out += new.pages
                return out, new
            n = self._common_pages(child.key, ids, at)
            if n * ps < len(child.key):
                child = self._split(child, n)
            first = at // ps
            dup = [p for p, q in zip(pages[first : first + n], child.pages, strict=True) if p != q]
            self.allocator.free(dup)
            child.last_used = now
            out += child.pages
            at += n * ps
            node = child
        return out, node

    def _stored(self, node: Node) -> None:
        """Hash a new node's pages and record them, when recording."""
        if self._events is None:
            return
        assert node.parent is not None
        parent = node.parent.hashes[-1] if node.parent.hashes else None
        prev, blocks = parent, []
        ps = self.page_size
        for i in range(len(node.pages)):
            tokens = node.key[i * ps : (i + 1) * ps]
            prev = block_hash(prev, tokens)
            blocks.append((prev, tokens))
        node.hashes = [h for h, _ in blocks]
        self._events.append(BlocksStored(parent, blocks))

    def lock(self, node: Node | None) -> None:
        """Protect the path root..node from eviction (None: nothing to protect)."""
        while node is not None and node is not self.root:
            if node.lock_ref == 0:
                self.locked_pages += len(node.pages)
            node.lock_ref += 1
            assert node.parent is not None
            node = node.parent

    def unlock(self, node: Node | None) -> None:
        """Undo one lock()."""
        while node is not None and node is not self.root:
            node.lock_ref -= 1
            if node.lock_ref < 0:
                raise AssertionError("radix node unlocked more often than locked")
            if node.lock_ref == 0:
                self.locked_pages -= len(node.pages)
            assert node.parent is not None
            node = node.parent

    def evict(self, num_pages: int) -> int:
        """Free at least `num_pages` pages of unlocked leaves if possible; returns pages freed."""
        heap = [(n.last_used, id(n), n) for n in self._nodes() if not n.children and not n.lock_ref]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_pages:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None
            del parent.children[self._child_key(node.key, 0)]
            if self._events is not None:
                self._events.append(BlocksRemoved(node.hashes))
            self.allocator.free(node.pages)
            freed += len(node.pages)
            self.cached_pages -= len(node.pages)
            if parent is not self.root and not parent.children and not parent.lock_ref:
                heapq.heappush(heap, (parent.last_used, id(parent), parent))
        return freed

    def reset(self) -> None:
        """Drop every unlocked entry (e.g. after weights change)."""
        self.evict(self.cached_pages)

    def _nodes(self) -> list[Node]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node is not self.root:
                out.append(node)
        return out

    def check(self) -> None:
        """Invariants: page counts add up, lock counts are sane, keys are page-aligned."""
        nodes = self._nodes()
        pages = [p for n in nodes for p in n.pages]
        if len(pages) != self.cached_pages or len(set(pages)) != len(pages):
            raise AssertionError("radix cache page count out of sync or a page cached twice")
        if sum(len(n.pages) for n in nodes if n.lock_ref) != self.locked_pages:
            raise AssertionError("radix cache locked-page count out of sync")
        for n in nodes:
            if n.lock_ref < 0 or len(n.key) != len(n.pages) * self.page_size or not n.key:
                raise AssertionError("radix node malformed")
            if self._events is not None and len(n.hashes) != len(n.pages):
                raise AssertionError("radix node without a block hash per page")
            assert n.parent is not None
            if n.lock_ref > n.parent.lock_ref and n.parent is not self.root:
                raise AssertionError("a locked radix node has a less-locked parent")
