"""Checks shared by the engine tests."""

from __future__ import annotations

from minisgl.llm import LLM


def assert_idle(llm: LLM) -> None:
    """Nothing queued or running, invariants hold, and every KV page is free again once the
    radix cache (which keeps finished prefixes until evicted) is dropped."""
    sched = llm.scheduler
    sched.check_invariants()
    assert not llm.has_unfinished()
    assert not sched.running and not sched.waiting
    # With overlap scheduling a step may still be in flight (the token after a stop, or a
    # step whose requests were all aborted): reading it back must produce nothing.
    assert sched.step() == []
    assert not sched.has_work()
    sched.release_all_cache()
    sched.check_invariants()
    assert sched.allocator.num_free == sched.allocator.num_pages
