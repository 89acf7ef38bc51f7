"""Online benchmark over gRPC (workload W5): Poisson arrivals, latency percentiles.

    python -m minisgl.bench.online --model llama-3.1-8b --dummy-weights       # starts a server
    python -m minisgl.bench.online --target 127.0.0.1:50051 --num-prompts 100 --rate 1

Sends --num-prompts StreamGenerate calls of random token-id prompts (input and output lengths
uniform in the given ranges, W3's by default; ignore_eos, greedy) with exponential gaps of mean
1 / --rate seconds, and reports the median and p99 of the time to first token (TTFT) and of the
inter-token latency (ITL: the gap between two streamed messages divided by the tokens of the
later one), plus output tok/s over the whole run. Without --target it starts `minisgl serve`
on a free local port with every flag it does not know itself (engine flags such as --model,
--dummy-weights, --overlap-schedule off).

    python -m minisgl.bench.online --sweep-rates 1,2,4,8 --num-prompts 50 --plot sweep.png

--sweep-rates runs the workload once per rate against one server (point i uses seed --seed + i,
so its prompts are new to the radix cache) and reports a point per rate; --plot draws each
point's TTFT and ITL (p50, p99) against its output tok/s as a PNG (the `plot` extra, matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from minisgl.bench import report
from minisgl.bench.grpc_overhead import local_server
from minisgl.bench.plot import exit_unless_plottable, plot_sweep
from minisgl.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
)


@dataclass
class RequestTrace:
    """When one request's messages arrived (seconds from its send) and how many tokens each."""

    prompt_tokens: int
    max_new_tokens: int
    arrivals: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.arrivals[0]

    def itls(self) -> list[float]:
        """Per-token gaps after the first message (a message of n tokens counts n gaps)."""
        out: list[float] = []
        for prev, now, n in zip(self.arrivals, self.arrivals[1:], self.tokens[1:], strict=False):
            out += [(now - prev) / n] * n if n else []
        return out


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; nan for no data."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


async def _one(
    stub: generation_pb2_grpc.GenerationServiceStub,
    prompt: list[int],
    max_new: int,
    delay: float,
    timeout: float,
) -> RequestTrace:
    await asyncio.sleep(delay)
    trace = RequestTrace(len(prompt), max_new)
    req = generation_pb2.StreamGenerateRequest(
        prompt=common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=prompt)),
        sampling=common_pb2.SamplingOptions(temperature=0.0),
        stopping=common_pb2.StoppingOptions(max_new_tokens=max_new, ignore_eos=True),
    )
    start = time.perf_counter()
    call: Any = stub.StreamGenerate(req, timeout=timeout)  # an aio call (the stubs type it sync)
    async for msg in call:
        if msg.token_ids:
            trace.arrivals.append(time.perf_counter() - start)
            trace.tokens.append(len(msg.token_ids))
    return trace


async def run(
    target: str,
    num_prompts: int,
    rate: float,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    seed: int,
    timeout: float,
) -> dict[str, Any]:
    """Run the workload against `target`; returns the figures (see the module doc)."""
    async with grpc.aio.insecure_channel(target) as channel:
        info = await model_pb2_grpc.ModelServiceStub(channel).GetModelInfo(
            model_pb2.GetModelInfoRequest(), timeout=30
        )
        rng = random.Random(seed)
        vocab = info.vocab_size
        prompts = [
            ([rng.randrange(10, vocab - 10) for _ in range(rng.randint(*input_len))],
             rng.randint(*output_len))
            for _ in range(num_prompts)
        ]  # fmt: skip
        delays, t = [], 0.0
        for _ in prompts:
            delays.append(t)
            t += rng.expovariate(rate) if rate != float("inf") else 0.0
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        start = time.perf_counter()
        traces = await asyncio.gather(
            *(_one(stub, p, n, d, timeout) for (p, n), d in zip(prompts, delays, strict=True))
        )
        wall = time.perf_counter() - start
    ttfts = [tr.ttft for tr in traces]
    itls = [x for tr in traces for x in tr.itls()]
    out_tokens = sum(sum(tr.tokens) for tr in traces)
    ms = 1e3
    return {
        "model": info.model,
        "device": info.device,
        "num_prompts": num_prompts,
        "rate": rate,
        "input_len": list(input_len),
        "output_len": list(output_len),
        "completed": sum(sum(tr.tokens) == tr.max_new_tokens for tr in traces),
        "wall_s": wall,
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / wall,
        "ttft_ms": {"median": ms * statistics.median(ttfts), "p99": ms * percentile(ttfts, 99)},
        "itl_ms": {"median": ms * percentile(itls, 50), "p99": ms * percentile(itls, 99)},
        "itl_samples": len(itls),
    }


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    return int(lo), int(hi or lo)


def _rates(text: str) -> list[float]:
    """--sweep-rates: comma-separated request rates > 0 (inf: all at once)."""
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not rates or any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"every rate must be > 0 (or inf): {text!r}")
    return rates


async def sweep(
    target: str,
    rates: list[float],
    num_prompts: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    seed: int,
    timeout: float,
) -> dict[str, Any]:
    """`run` at each rate in turn (point i with seed `seed + i`); one point per rate."""
    points = []
    for i, rate in enumerate(rates):
        point = await run(target, num_prompts, rate, input_len, output_len, seed + i, timeout)
        points.append({**point, "seed": seed + i})
    return {
        "model": points[0]["model"],
        "device": points[0]["device"],
        "rates": rates,
        "points": points,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--target", default=None, help="host:port of a running server")
    ap.add_argument("--num-prompts", type=int, default=100, help="requests to send")
    ap.add_argument("--rate", type=float, default=1.0, help="mean arrivals per second (inf: all)")
    ap.add_argument("--input-len", type=_range, default=(1, 4096), help="LOW,HIGH prompt tokens")
    ap.add_argument("--output-len", type=_range, default=(1, 2048), help="LOW,HIGH new tokens")
    ap.add_argument("--seed", type=int, default=0, help="seed for lengths, tokens and arrivals")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per-request deadline, s")
    ap.add_argument("--json", default=None, help="write the results to this file")
    ap.add_argument(
        "--sweep-rates",
        type=_rates,
        default=None,
        metavar="R1,R2,...",
        help="run at each of these rates instead of --rate, a point each",
    )
    ap.add_argument(
        "--plot", default=None, metavar="PNG", help="with --sweep-rates: latency vs throughput"
    )
    args, server_flags = ap.parse_known_args()
    if args.plot and not args.sweep_rates:
        ap.error("--plot needs --sweep-rates")
    if args.plot:
        exit_unless_plottable()
    lengths = (args.input_len, args.output_len, args.seed, args.timeout)

    async def measure(target: str) -> dict[str, Any]:
        if args.sweep_rates:
            return await sweep(target, args.sweep_rates, args.num_prompts, *lengths)
        return await run(target, args.num_prompts, args.rate, *lengths)

    if args.target:
        result = asyncio.run(measure(args.target))
    else:
        with local_server(server_flags) as target:
            result = asyncio.run(measure(target))
        result["server_flags"] = server_flags
    report(result, args.json)
    if args.plot:
        title = f"{result['model']} on {result['device']}, {args.num_prompts} requests per rate"
        plot_sweep(result["points"], args.plot, title)


if __name__ == "__main__":
    main()
