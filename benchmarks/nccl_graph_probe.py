"""Does an NCCL all-reduce made through torch.distributed replay correctly in a CUDA graph here?

Run on a machine with 2+ GPUs (device tool kind nvidia-h100-x2):

    timeout 120 python benchmarks/nccl_graph_probe.py [--ranks 2]

Each rank prints each stage as it reaches it (so a hang names its stage): process group up,
an eager all-reduce, a warm-up on the capture stream, the capture, then 100 replays with new
inputs, each checked against the sum every rank can compute. minisgl decodes tensor-parallel
ranks without CUDA graphs until this passes (minisgl.engine.cuda_graph.use_decode_graphs).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minisgl.distributed.rendezvous import free_port

REPLAYS = 100


def say(rank: int, what: str) -> None:
    print(f"[rank {rank} {time.strftime('%H:%M:%S')}] {what}", flush=True)


def probe(rank: int, size: int, port: int) -> None:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
        device_id=device,
    )  # fmt: skip
    say(rank, "process group up")
    x = torch.full((4096,), float(rank + 1), device=device)
    dist.all_reduce(x)
    torch.cuda.synchronize()
    assert x[0].item() == size * (size + 1) / 2, x[0].item()
    say(rank, "eager all-reduce correct")
    stream = torch.cuda.Stream(device)
    static = torch.zeros(4096, device=device)
    with torch.cuda.stream(stream):
        for _ in range(2):
            y = static * 2
            dist.all_reduce(y)
        torch.cuda.synchronize()
        say(rank, "warm-up on the capture stream done")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = static * 2
            dist.all_reduce(out)
    torch.cuda.synchronize()
    say(rank, "captured")
    t = time.perf_counter()
    for i in range(REPLAYS):
        static.fill_(float(i + rank))
        graph.replay()
        expected = 2 * sum(i + r for r in range(size))
        got = out[0].item()
        if got != expected:
            say(rank, f"replay {i}: got {got}, expected {expected}")
            sys.exit(1)
    say(rank, f"{REPLAYS} replays correct, {(time.perf_counter() - t) / REPLAYS * 1e6:.0f} us each")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2, help="processes, one GPU each")
    args = ap.parse_args()
    if torch.cuda.device_count() < args.ranks:
        sys.exit(f"needs {args.ranks} GPUs, this machine has {torch.cuda.device_count()}")
    mp.spawn(probe, args=(args.ranks, free_port()), nprocs=args.ranks)
    print("OK: NCCL all-reduce replays correctly in a CUDA graph")


if __name__ == "__main__":
    main()
