"""Fused MoE micro-benchmark on the GPU: the grouped Triton kernels against the copy rate.

    python -m minisgl.bench.moe [--sweep] [--json out.json]

For each MoE shape (Qwen3-30B-A3B and Mixtral-8x7B on one rank) and token count it times one
MoE block (`minisgl.kernels.moe.moe_grouped`: routing, gate_up, down, the weighted sum),
replayed in a CUDA graph over 16 calls with fresh routing, and reports the bytes of the routed
experts' weights read per second as a share of the device-to-device copy rate measured in the
same run. `--sweep` also times the decode tile configurations (row blocks of 16), checks each
one's output against the default's, and prints the best next to the default.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict

import torch

from minisgl.bench.attention import copy_bandwidth, graph_us
from minisgl.kernels import moe

#: name -> (experts, top-k, hidden, moe intermediate size), from the presets' configs.
SHAPES = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336)}
CALLS = 16


def configs() -> list[moe.TileConfig]:
    """The decode tile configurations a sweep tries."""
    return [
        moe.TileConfig(16, n, k, 4, s)
        for n, k, s in itertools.product((16, 32, 64), (64, 128, 256), (3, 4))
    ]


class Case:
    """Stacked bf16 expert weights of one shape and CALLS inputs of `tokens` tokens."""

    def __init__(self, shape: tuple[int, int, int, int], tokens: int) -> None:
        experts, self.top_k, hidden, inter = shape
        dev = torch.device("cuda")
        gen = torch.Generator(device=dev).manual_seed(tokens)
        self.w13 = torch.randn(experts, 2 * inter, hidden, device=dev, generator=gen).bfloat16()
        self.w2 = torch.randn(experts, hidden, inter, device=dev, generator=gen).bfloat16()
        self.w13 *= 0.02
        self.w2 *= 0.02
        self.xs = [torch.randn(tokens, hidden, device=dev, generator=gen).bfloat16()
                   for _ in range(CALLS)]  # fmt: skip
        self.logits = [torch.randn(tokens, experts, device=dev, generator=gen)
                       for _ in range(CALLS)]  # fmt: skip
        active = sum(len(torch.topk(lg, self.top_k).indices.unique()) for lg in self.logits)
        self.active = active / CALLS
        self.read_bytes = self.active * 3 * inter * hidden * 2  # routed experts, per call
        self.default = moe.tile_config(tokens * self.top_k, experts)

    def call(self, i: int, cfg: moe.TileConfig | None) -> torch.Tensor:
        return moe.moe_grouped(self.xs[i], self.logits[i], self.w13, self.w2, self.top_k, True, cfg)

    def time(self, cfg: moe.TileConfig | None) -> float:
        def run() -> None:
            for i in range(CALLS):
                self.call(i, cfg)

        return graph_us(run, CALLS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="MoE shapes (default: %(default)s)")
    ap.add_argument("--tokens", default="1,8,64,256", help="tokens per call (default: %(default)s)")
    ap.add_argument("--sweep", action="store_true", help="also sweep the decode tiles")
    ap.add_argument("--json", help="write every timed row to this file")
    args = ap.parse_args()
    copy = copy_bandwidth(torch.device("cuda"))
    print(f"copy bandwidth {copy / 1e12:.2f} TB/s; {torch.cuda.get_device_name()}")
    rows: list[dict[str, object]] = []
    for name, tokens in itertools.product(args.shapes.split(","), map(int, args.tokens.split(","))):
        case = Case(SHAPES[name], tokens)
        ref = case.call(0, None)
        timed = [(case.time(None), case.default)]
        if args.sweep and tokens * case.top_k <= 4 * SHAPES[name][0]:
            for cfg in configs():
                torch.testing.assert_close(case.call(0, cfg), ref, atol=2e-2, rtol=2e-2)
                timed.append((case.time(cfg), cfg))
        for i, (us, cfg) in enumerate(timed):
            share = case.read_bytes / (us * 1e-6) / copy
            rows.append({"shape": name, "tokens": tokens, "config": asdict(cfg),
                         "default": i == 0, "us": us, "of_copy": share})  # fmt: skip
        us, best = min(timed, key=lambda t: t[0])
        line = (
            f"{name:>14} tokens {tokens:>4} ({case.active:.1f} experts): default "
            f"{timed[0][0]:8.1f} us {case.read_bytes / (timed[0][0] * 1e-6) / copy:5.1%} of copy"
        )
        if len(timed) > 1:
            line += f"; best {us:8.1f} us {case.read_bytes / (us * 1e-6) / copy:5.1%} ({best})"
        print(line, flush=True)
        del case
        torch.cuda.empty_cache()
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"copy_bandwidth_gb_s": copy / 1e9, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
