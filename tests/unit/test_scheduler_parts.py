"""The scheduler's parts on their own: pages and rows with and without a prefix cache, and the
rule that the scheduler hands the engine host data only."""

from __future__ import annotations

import ast
from pathlib import Path

from minisgl.sampling_params import SamplingParams
from minisgl.scheduler.pages import KVPages
from minisgl.scheduler.request import Req

PAGE = 2


def _req(rid: str, tokens: list[int]) -> Req:
    return Req(rid, tokens, SamplingParams(max_new_tokens=1), 0, frozenset(), 1)


def _admit(kv: KVPages, req: Req) -> None:
    pages, node = kv.match(req)
    kv.admit(req, pages, node, kv.pages_for(req.seq_len) - len(pages))
    req.num_computed = req.seq_len


def test_without_a_prefix_cache_nothing_is_kept_or_shared() -> None:
    kv = KVPages(num_pages=4, page_size=PAGE, max_rows=2, prefix_cache=False)
    a, b = _req("a", [1, 2, 3, 4]), _req("b", [1, 2, 3, 4])
    _admit(kv, a)
    kv.release(a, cache_it=True)
    assert kv.allocator.num_free == 4 and kv.cache.cached_pages == 0 and kv.available == 4
    _admit(kv, b)  # the same tokens: no match, so no shared pages
    assert b.shared_pages == 0 and len(b.pages) == 2
    kv.check([b], [])
    kv.release(b, cache_it=True)
    kv.check([], [])
    assert kv.allocator.num_free == 4


def test_allocation_evicts_cached_pages_when_too_few_are_free() -> None:
    kv = KVPages(num_pages=4, page_size=PAGE, max_rows=2, prefix_cache=True)
    a = _req("a", [1, 2, 3, 4])
    _admit(kv, a)
    kv.release(a, cache_it=True)  # its two full pages go to the cache
    assert kv.allocator.num_free == 2 and kv.cache.cached_pages == 2 and kv.available == 4
    b = _req("b", [5, 6, 7, 8, 9, 10, 11, 12])  # needs all four pages
    _admit(kv, b)
    assert len(b.pages) == 4 and kv.cache.cached_pages == 0
    kv.check([b], [])
    writes = kv.take_table_writes()
    assert [writes[b.row, i] for i in range(4)] == b.pages  # every page reaches the table
    assert kv.take_table_writes() == {}


def test_decode_pages_come_from_the_same_evicting_allocation() -> None:
    kv = KVPages(num_pages=3, page_size=PAGE, max_rows=2, prefix_cache=True)
    a, b = _req("a", [1, 2]), _req("b", [3, 4])
    _admit(kv, a)
    kv.release(a, cache_it=True)  # one cached page, two free
    _admit(kv, b)
    c = _req("c", [5, 6])
    _admit(kv, c)  # the last free page: the cached one must be evicted for the next
    assert kv.allocator.num_free == 0 and kv.available == 1
    kv.grow_each([b])
    assert len(b.pages) == 2 and kv.cache.cached_pages == 0
    kv.check([b, c], [])


def test_the_scheduler_never_touches_device_tensors() -> None:
    """Device state has one owner, the ModelRunner: the scheduler's planning modules do not
    import torch (they hand the runner a StepPlan of host lists)."""
    root = Path(__file__).resolve().parents[2] / "minisgl" / "scheduler"
    for name in ("scheduler.py", "pages.py", "policy.py", "batch.py"):
        tree = ast.parse((root / name).read_text())
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            (node.module or "").split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
        }
        assert "torch" not in imported, f"scheduler/{name} imports torch"
