"""Decode attention micro-benchmark on the GPU: the split-KV Triton kernel against the copy rate.

    python -m minisgl.bench.attention [--sweep] [--json out.json]

For each case (model heads, batch size, context length, cache dtype) it times one layer's
decode attention (`minisgl.kernels.attention.decode_attention`, merge included), replayed in
a CUDA graph over as many layers' caches as keep the data well past the L2 cache, and reports
the cache bytes read per second as a share of the device-to-device copy rate measured in the
same run (counting read + write, the rate a kernel that only reads can approach). Pages are
scattered over the pool as after churn.

`--sweep` also times every decode tile configuration (BLOCK_N, warps, stages, and for FP8
caches the float16 dots) with the default split count, then the split counts around the
default with the best tiles, and prints the best of each case next to the default.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from minisgl.kernels import attention as kernels

#: (label, query heads, kv heads, head dim) of the models the workloads use.
HEADS = {
    "qwen3-0.6b": (16, 8, 128),
    "llama-3.1-8b": (32, 8, 128),
    "qwen2-0.5b": (14, 2, 64),
}
#: (batch, context) operating points: W1 / W3 (batch 64-256, 500-4,000 keys) and batch 1-8 long.
POINTS = [(1, 4000), (1, 32000), (8, 4000), (8, 32000), (64, 1000), (64, 4000), (256, 500),
          (256, 1000), (256, 2000)]  # fmt: skip
PAGE_SIZE = 16
L2_MULTIPLE = 256 * 2**20  # replay over layers until this many cache bytes are read per replay


@dataclass
class Row:
    model: str
    batch: int
    context: int
    kv_dtype: str
    splits: int
    config: dict[str, object]
    us: float
    gb_s: float
    of_copy: float


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy rate in bytes/s (read + write), the best of a few 1 GiB copies."""
    n = 2**30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        best = max(best, 2 * n / (start.elapsed_time(end) * 1e-3))
    return best


def graph_us(fn: Callable[[], None], calls: int) -> float:
    """Microseconds per call of `fn`, which makes `calls` kernel calls, replayed in a graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(2):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(7):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return float(sorted(times)[len(times) // 2])


class Case:
    """Random queries, caches of `layers` layers and a scattered page table for one point."""

    def __init__(
        self, heads: tuple[int, int, int], batch: int, context: int, kv_dtype: torch.dtype
    ) -> None:
        hq, hkv, d = heads
        device = torch.device("cuda")
        pages_per_req = -(-context // PAGE_SIZE)
        num_pages = batch * pages_per_req + 1
        layer_bytes = 2 * batch * context * hkv * d * kv_dtype.itemsize
        self.layers = max(1, min(28, math.ceil(L2_MULTIPLE / layer_bytes)))
        self.read_bytes = layer_bytes  # per layer call
        gen = torch.Generator(device=device).manual_seed(0)

        def cache() -> torch.Tensor:
            x = torch.randn(num_pages * PAGE_SIZE, hkv, d, device=device, generator=gen)
            return x.to(kv_dtype)

        self.k = [cache() for _ in range(self.layers)]
        self.v = [cache() for _ in range(self.layers)]
        perm = torch.randperm(num_pages - 1, device=device, generator=gen) + 1
        self.page_table = perm[: batch * pages_per_req].view(batch, pages_per_req).int()
        self.req_rows = torch.arange(batch, dtype=torch.int32, device=device)
        self.seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        self.q = torch.randn(batch, hq, d, device=device, generator=gen).bfloat16()
        self.out = torch.empty_like(self.q)
        self.batch, self.hkv, self.hq, self.d, self.context = batch, hkv, hq, d, context

    def default_splits(self) -> int:
        sms = kernels.num_sms(self.q.device)
        return kernels.choose_num_splits(self.batch, self.hkv, self.context, sms)

    def time(self, splits: int, config: kernels.DecodeConfig | None) -> float:
        mid_o = torch.empty(self.batch, self.hq, splits, self.d, device=self.q.device)
        mid_lse = torch.empty(self.batch, self.hq, splits, device=self.q.device)

        def run() -> None:
            for k, v in zip(self.k, self.v, strict=True):
                kernels.decode_attention(
                    self.q, k, v, self.out, self.req_rows, self.page_table, self.seq_lens,
                    PAGE_SIZE, self.d**-0.5, splits, mid_o, mid_lse, config=config,
                )  # fmt: skip

        return graph_us(run, self.layers)


def configs(head_dim: int, fp8: bool) -> list[kernels.DecodeConfig]:
    """The tile configurations a sweep tries."""
    block_ns = (64, 128) if head_dim <= 128 else (32, 64)
    f16 = (False, True) if fp8 else (False,)
    return [
        kernels.DecodeConfig(n, w, s, f)
        for n, w, s, f in itertools.product(block_ns, (4, 8), (2, 3, 4), f16)
    ]


def run_case(
    model: str, kv_name: str, case: Case, copy: float, sweep: bool, rows: list[Row]
) -> str:
    """Time one case (and its sweep), append the rows, return the line to print."""
    kv_dtype = case.k[0].dtype

    def row(splits: int, cfg: kernels.DecodeConfig | None) -> Row:
        us = case.time(splits, cfg)
        gb_s = case.read_bytes / (us * 1e-6) / 1e9
        used = cfg or kernels.decode_config(
            case.d, torch.bfloat16, kv_dtype, kernels.smem_per_block(case.q.device)
        )
        r = Row(model, case.batch, case.context, kv_name, splits, asdict(used), us, gb_s,
                gb_s * 1e9 / copy)  # fmt: skip
        rows.append(r)
        return r

    base = row(case.default_splits(), None)
    line = (
        f"{model:>13} {kv_name:>4} b{case.batch:<4} ctx {case.context:>6}: default "
        f"{base.us:8.1f} us {base.of_copy:5.1%} of copy (splits {base.splits})"
    )
    if not sweep:
        return line
    tiles = [row(base.splits, c) for c in configs(case.d, kv_name == "fp8")]
    best_tile = min(tiles, key=lambda r: r.us)
    best_cfg = kernels.DecodeConfig(**best_tile.config)  # type: ignore[arg-type]
    around = {max(1, base.splits * f // 4) for f in (1, 2, 8, 16, 32)} - {base.splits}
    splits = [row(s, best_cfg) for s in sorted(around) if s <= 64]
    best = min([best_tile, *splits], key=lambda r: r.us)
    return line + (
        f"; best {best.us:8.1f} us {best.of_copy:5.1%} ({best.config}, splits {best.splits})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default=",".join(HEADS), help="head layouts (default: %(default)s)")
    ap.add_argument("--kv-dtypes", default="bf16,fp8", help="cache dtypes (default: %(default)s)")
    ap.add_argument("--sweep", action="store_true", help="also sweep tiles and split counts")
    ap.add_argument("--json", help="write every timed row to this file")
    args = ap.parse_args()
    device = torch.device("cuda")
    copy = copy_bandwidth(device)
    print(f"copy bandwidth {copy / 1e12:.2f} TB/s; {torch.cuda.get_device_name(device)}")
    rows: list[Row] = []
    dtypes = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
    for model, kv_name in itertools.product(args.models.split(","), args.kv_dtypes.split(",")):
        for batch, context in POINTS:
            case = Case(HEADS[model], batch, context, dtypes[kv_name])
            print(run_case(model, kv_name, case, copy, args.sweep, rows), flush=True)
            del case
            torch.cuda.empty_cache()
            if args.json:  # after each case, so an interrupted run keeps what it timed
                with open(args.json, "w") as f:
                    rows_json = [asdict(r) for r in rows]
                    json.dump({"copy_bandwidth_gb_s": copy / 1e9, "rows": rows_json}, f, indent=1)


if __name__ == "__main__":
    main()
