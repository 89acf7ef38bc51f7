"""Where a decode step's time goes: wall time per step, the GPU kernels, and the CPU part.

    python -m minisgl.bench.profile --model qwen3-0.6b --dummy-weights --batch 256 --input-len 512

Fills the batch, lets every request reach decode, then times `steps` steps (wall, and the
time inside ModelRunner.forward/sample with a sync) and profiles a few with torch.profiler,
printing the kernels that take the most GPU time.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

import torch

from minisgl.cli import add_engine_args, engine_options
from minisgl.llm import LLM
from minisgl.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--log-level", default="WARNING")
    add_engine_args(ap)
    args = ap.parse_args()
    llm = LLM(args.model, **engine_options(args))
    vocab = llm.runner.model_config.vocab_size
    rng = random.Random(0)
    params = SamplingParams(
        temperature=args.temperature, max_new_tokens=args.steps * 3 + 50, ignore_eos=True
    )
    for _ in range(args.batch):
        llm.submit([rng.randrange(10, vocab - 10) for _ in range(args.input_len)], params)
    sched = llm.scheduler
    while sum(r.is_decoding for r in sched.running) < args.batch:
        llm.step()
    for _ in range(5):
        llm.step()
    runner = llm.runner
    inside = 0.0
    forward, sample = runner.forward, runner.sample

    def timed(fn: Any) -> Any:
        def wrapper(*a: Any) -> Any:
            nonlocal inside
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn(*a)
            torch.cuda.synchronize()
            inside += time.perf_counter() - t
            return out

        return wrapper

    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps):
        llm.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / args.steps
    runner.forward, runner.sample = timed(forward), timed(sample)  # type: ignore[method-assign]
    t = time.perf_counter()
    for _ in range(args.steps):
        llm.step()
    synced = (time.perf_counter() - t) / args.steps
    gpu = inside / args.steps
    runner.forward, runner.sample = forward, sample  # type: ignore[method-assign]
    print(
        f"batch {args.batch}: {1e3 * wall:.2f} ms/step ({args.batch / wall:.0f} tok/s); "
        f"with syncs {1e3 * synced:.2f} ms of which forward+sample {1e3 * gpu:.2f} ms, "
        f"CPU rest {1e3 * (synced - gpu):.2f} ms"
    )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            llm.step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.profiler.DeviceType.CUDA]
    layers = llm.runner.model_config.num_layers
    per_step = sum(e.count for e in kernels) / 5
    busy_us = sum(e.self_device_time_total for e in kernels) / 5
    print(
        f"GPU kernels and copies per step: {per_step:.0f} "
        f"({per_step / layers:.1f} per layer of {layers}); "
        f"GPU busy {busy_us / 1e3:.2f} ms per step"
    )
    print(events.table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
