"""The prefix cache interface the scheduler sees, and the cache to use when there is none.

`RadixCache` shares pages between requests with a common prefix; `NoPrefixCache` keeps
nothing, so that code using a prefix cache never has to ask whether there is one.
"""

from __future__ import annotations

from typing import Protocol

from minisgl.kvcache.radix import CacheEvent, Node


class PrefixCache(Protocol):
    """Cached KV pages keyed by token ids; a locked node's pages are never evicted."""

    #: Whether `insert` takes pages over (False: the caller keeps them private).
    keeps_pages: bool

    @property
    def cached_pages(self) -> int: ...

    @property
    def evictable_pages(self) -> int: ...

    def match(self, ids: list[int]) -> tuple[list[int], Node | None]: ...

    def match_len(self, ids: list[int]) -> int: ...

    def insert(self, ids: list[int], pages: list[int]) -> tuple[list[int], Node]: ...

    def lock(self, node: Node | None) -> None: ...

    def unlock(self, node: Node | None) -> None: ...

    def evict(self, num_pages: int) -> int: ...

    def reset(self) -> None: ...

    def check(self) -> None: ...

    def record_events(self) -> None: ...

    def take_events(self) -> list[CacheEvent]: ...


class NoPrefixCache:
    """A prefix cache that holds nothing: every match is empty, nothing is ever evictable."""

    keeps_pages = False
    cached_pages = 0
    evictable_pages = 0

    def match(self, ids: list[int]) -> tuple[list[int], Node | None]:
        return [], None

    def match_len(self, ids: list[int]) -> int:
        return 0

    def insert(self, ids: list[int], pages: list[int]) -> tuple[list[int], Node]:
        raise AssertionError("NoPrefixCache keeps no pages (see keeps_pages)")

    def lock(self, node: Node | None) -> None:
        pass

    def unlock(self, node: Node | None) -> None:
        pass

    def evict(self, num_pages: int) -> int:
        return 0

    def reset(self) -> None:
        pass

    def check(self) -> None:
        pass

    def record_events(self) -> None:
        pass

    def take_events(self) -> list[CacheEvent]:
        return []
