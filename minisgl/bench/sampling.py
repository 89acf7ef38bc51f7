"""Sampling micro-benchmark on the GPU: microseconds per call for each batch and filter.

    python -m minisgl.bench.sampling --vocab 151936 --batches 1,8,64,256 [--json out.json]

For each batch size and mode (greedy; temperature 0.6; top-k 50; top-p 0.9; min-p 0.05;
top-k 50 with top-p 0.9) it times, from random float32 logits:
- fused: minisgl.engine.sampler._sample_fused, the split-vocabulary kernels ("-" where the
  fused path does not cover the mode and the sampler uses torch);
- one_program: the one-program-per-row kernel (greedy and temperature only);
- torch: the sampler's torch path (minisgl.engine.sampler.sample_torch);
- topk: torch.topk of the top-k / top-p candidates alone (part of fused);
- floor: reading the logits once at the copy bandwidth measured on the same GPU.
GPU times are CUDA-graph replays (no Python launch cost); `fused_eager` is the same call
launched from Python each time, as the engine calls it (its CPU time overlaps the GPU's).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch

from minisgl.engine import sampler
from minisgl.engine.sampler import SamplingBatch
from minisgl.sampling_params import GREEDY_TEMPERATURE

MODES: dict[str, dict[str, float]] = {
    "greedy": {"temperature": 0.0},
    "temperature": {"temperature": 0.6},
    "top_k": {"temperature": 0.6, "top_k": 50},
    "top_p": {"temperature": 0.6, "top_p": 0.9},
    "min_p": {"temperature": 0.6, "min_p": 0.05},
    "top_k_p": {"temperature": 0.6, "top_k": 50, "top_p": 0.9},
}


def make_batch(bsz: int, vocab: int, mode: dict[str, float]) -> SamplingBatch:
    """A batch of `bsz` rows with one mode's settings, as the scheduler builds it."""
    dev = torch.device("cuda")
    temp = mode.get("temperature", 1.0)
    k = int(mode.get("top_k", vocab))
    p = mode.get("top_p", 1.0)
    mp = mode.get("min_p", 0.0)
    sampled = temp >= GREEDY_TEMPERATURE
    cut = sampled and (k < vocab or p < 1.0)
    return SamplingBatch(
        temperature=torch.full((bsz,), temp, device=dev),
        top_k=torch.full((bsz,), k, dtype=torch.int64, device=dev),
        top_p=torch.full((bsz,), p, device=dev),
        min_p=torch.full((bsz,), mp, device=dev),
        seeds=torch.arange(bsz, dtype=torch.int64, device=dev) * 7919,
        steps=torch.full((bsz,), 17, dtype=torch.int64, device=dev),
        all_greedy=not sampled,
        use_top_k=sampled and k < vocab,
        use_top_p=sampled and p < 1.0,
        use_min_p=sampled and mp > 0.0,
        penalties=None,
        banned_ids=None,
        want_logprobs=False,
        top_logprobs=0,
        max_top_k=k if cut else 0,
    )


def gpu_us(fn: Callable[[], object], iters: int) -> float:
    """GPU microseconds per call of `fn`, replayed from a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _timed(graph.replay, iters)


def eager_us(fn: Callable[[], object], iters: int) -> float:
    """Wall microseconds per call of `fn` launched from Python."""
    for _ in range(3):
        fn()
    return _timed(fn, iters)


def _timed(fn: Callable[[], object], iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return float(1e3 * start.elapsed_time(end) / iters)


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (each byte read once, written once)."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    us = gpu_us(lambda: dst.copy_(src), 20)
    return 2 * src.numel() * 4 / (us * 1e-6)


def run(vocab: int, batches: list[int], iters: int) -> list[dict[str, object]]:
    from minisgl.kernels import sampling

    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    rows: list[dict[str, object]] = []
    for bsz in batches:
        gen = torch.Generator(device="cuda").manual_seed(bsz)
        logits = 3 * torch.randn(bsz, vocab, device="cuda", generator=gen)
        floor = logits.numel() * 4 / bandwidth * 1e6
        for name, mode in MODES.items():
            sb = make_batch(bsz, vocab, mode)
            row: dict[str, object] = {"batch": bsz, "vocab": vocab, "mode": name}
            row["floor_us"] = round(floor, 2)

            def fused(x: torch.Tensor = logits, b: SamplingBatch = sb) -> object:
                return sampler._sample_fused(x, b)

            def torch_path(x: torch.Tensor = logits, b: SamplingBatch = sb) -> object:
                return sampler.sample_torch(x, b)

            covered = fused() is not None
            row["fused_us"] = round(gpu_us(fused, iters), 2) if covered else None
            row["fused_eager_us"] = round(eager_us(fused, iters), 2) if covered else None
            if not (sb.use_top_k or sb.use_top_p or sb.use_min_p):
                hashes = sampler.row_hash(sb.seeds, sb.steps)

                def one_program(
                    x: torch.Tensor = logits, b: SamplingBatch = sb, h: torch.Tensor = hashes
                ) -> object:
                    return sampling.sample_rows_one_program(x, b.temperature, h)

                row["one_program_us"] = round(gpu_us(one_program, iters), 2)
            row["torch_us"] = round(gpu_us(torch_path, iters), 2)
            if sb.use_top_k or sb.use_top_p:
                n_cand = min(sb.max_top_k or sampling.MAX_CANDIDATES, sampling.MAX_CANDIDATES)

                def topk(x: torch.Tensor = logits, n: int = n_cand) -> object:
                    return x.topk(n, dim=-1)

                row["topk_us"] = round(gpu_us(topk, iters), 2)  # the candidates' part of fused
            rows.append(row)
            print(
                f"B={bsz:4d} {name:12s} "
                + " ".join(f"{key}={value}" for key, value in row.items() if key.endswith("_us"))
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--json", default=None, help="write the rows to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("the sampling benchmark needs a CUDA GPU")
    rows = run(args.vocab, [int(b) for b in args.batches.split(",")], args.iters)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
