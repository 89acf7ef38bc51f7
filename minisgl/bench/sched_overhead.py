"""Scheduler overhead per step: Python time outside the model's forward and sampling.

Runs the demo model on CPU with N running requests decoding together and reports the
time per step spent in the scheduler (planning, page allocation, batch tensors, result
processing), i.e. step time minus the time inside ModelRunner.forward and .sample.

    python -m minisgl.bench.sched_overhead --requests 256 --steps 50
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from minisgl.llm import LLM
from minisgl.sampling_params import SamplingParams


def measure(requests: int, steps: int, prompt_len: int, **engine: Any) -> dict[str, float]:
    """Per-step scheduler and model times (ms) once all requests decode together."""
    llm = LLM(None, progress=False, max_running_requests=requests, **engine)
    params = SamplingParams(temperature=0.0, max_new_tokens=steps + 10, ignore_eos=True)
    rids = [
        llm.submit([3 + (i * 7 + j) % 2000 for j in range(prompt_len)], params)
        for i in range(requests)
    ]
    sched, runner = llm.scheduler, llm.runner
    inside = 0.0
    forward, sample = runner.forward, runner.sample

    def timed(fn: Any) -> Any:
        def wrapper(*args: Any) -> Any:
            nonlocal inside
            t = time.perf_counter()
            out = fn(*args)
            inside += time.perf_counter() - t
            return out

        return wrapper

    runner.forward = timed(forward)  # type: ignore[method-assign]
    runner.sample = timed(sample)  # type: ignore[method-assign]
    while len([r for r in sched.running if r.is_decoding]) < requests:
        sched.step()
    inside, total = 0.0, 0.0
    for _ in range(steps):
        t = time.perf_counter()
        sched.step()
        total += time.perf_counter() - t
    for rid in rids:
        llm.abort(rid)
    return {
        "requests": requests,
        "steps": steps,
        "step_ms": 1e3 * total / steps,
        "model_ms": 1e3 * inside / steps,
        "scheduler_ms": 1e3 * (total - inside) / steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=256, help="running requests")
    ap.add_argument("--steps", type=int, default=50, help="decode steps timed")
    ap.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt")
    ap.add_argument("--page-size", type=int, default=16, help="KV page size")
    args = ap.parse_args()
    result = measure(args.requests, args.steps, args.prompt_len, page_size=args.page_size)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
