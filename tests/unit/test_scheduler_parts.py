"""The scheduler's parts on their own: pages and rows with and without a prefix cache, the batch
planner, and the rule that the scheduler hands the engine host data only."""

from __future__ import annotations

import ast
from pathlib import Path

from minisgl.sampling_params import SamplingParams
from minisgl.scheduler.pages import KVPages
from minisgl.scheduler.planner import BatchPlanner
from minisgl.scheduler.policy import AdmissionPolicy
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
    for name in ("scheduler.py", "planner.py", "pages.py", "policy.py", "batch.py"):
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


def _planner(num_pages: int, max_rows: int, budget: int) -> BatchPlanner:
    kv = KVPages(num_pages, PAGE, max_rows, prefix_cache=True)
    return BatchPlanner(kv, AdmissionPolicy("fcfs", PAGE), budget, max_model_len=64)


def _prefilled(planner: BatchPlanner, prompts: dict[str, list[int]], max_new: int) -> list[Req]:
    """Admit requests in one step and pretend their prompts ran: they decode next."""
    reqs = [
        Req(rid, tokens, SamplingParams(max_new_tokens=max_new), 0, frozenset(), max_new)
        for rid, tokens in prompts.items()
    ]
    planner.waiting.extend(reqs)
    planner.policy.new_token_ratio = 0.0  # no page reserve: the test fills the pool exactly
    assert planner.plan() == [(r, len(r.prompt_ids)) for r in reqs]
    for r in reqs:
        r.num_computed = len(r.prompt_ids)
        r.output_ids.append(7)
    return reqs


def test_planner_splits_prompts_by_the_token_budget_and_admits_in_order() -> None:
    planner = _planner(num_pages=32, max_rows=4, budget=5)
    a = Req("a", list(range(1, 9)), SamplingParams(max_new_tokens=1), 0, frozenset(), 1)
    b = Req("b", [20, 21], SamplingParams(max_new_tokens=1), 0, frozenset(), 1)
    planner.waiting.extend([a, b])
    assert planner.plan() == [(a, 5)]  # the budget ends inside a's prompt: b waits
    assert list(planner.waiting) == [b] and planner.running == [a]
    a.num_computed = 5
    assert planner.plan() == [(a, 3), (b, 2)]  # a's last chunk, then b within what is left
    assert planner.prompt_tokens == 10 and planner.cached_tokens == 0


def test_planner_retracts_the_newest_decode_when_pages_run_out() -> None:
    planner = _planner(num_pages=3, max_rows=4, budget=64)
    # One and two full pages: each one's next token needs a page, and none is free.
    old, new = _prefilled(planner, {"old": [1, 2], "new": [3, 4, 5, 6]}, max_new=8)
    assert planner.kv.allocator.num_free == 0 and planner.kv.available == 0
    plan = planner.plan()
    # No page for both next tokens: the newest request goes back to the front of the queue
    # (its pages to the cache), and the oldest decodes with a page evicted from there.
    assert plan[0] == (old, 1) and planner.retractions == 1
    assert new.row < 0 and new.num_computed == 0 and planner.waiting[0] is new
    assert len(old.pages) == 2
    planner.kv.check(planner.running, planner.waiting)
