"""What the gRPC server adds on top of the engine, with the demo model on CPU.

(a) Added time to first token: the median TTFT of sequential single StreamGenerate calls
    minus the median time to first token of the offline API (LLM.submit, then LLM.step
    until the request has a token), same prompt, for each --max-new-tokens.
(b) Streamed tokens/s through one frontend with --streams concurrent StreamGenerate calls
    (ignore_eos, --stream-tokens each, one asyncio client), median of --repeats batches,
    next to the offline API's LLM.generate on the same batches.

Starts `minisgl serve` on a free local port (or measures --target) and prints JSON.

    python -m minisgl.bench.grpc_overhead
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from minisgl.v1 import common_pb2, generation_pb2, generation_pb2_grpc

PROMPT = "The quick brown fox jumps over the lazy dog"
STARTUP_S = 180.0
_ROOT = str(Path(__file__).resolve().parents[2])


def _request(
    prompt: str, max_new_tokens: int, **stopping: Any
) -> generation_pb2.StreamGenerateRequest:
    return generation_pb2.StreamGenerateRequest(
        prompt=common_pb2.Prompt(text=prompt),
        sampling=common_pb2.SamplingOptions(temperature=0.0),
        stopping=common_pb2.StoppingOptions(max_new_tokens=max_new_tokens, **stopping),
    )


@contextmanager
def local_server(flags: list[str]) -> Iterator[str]:
    """`minisgl serve` on a free port until the block ends; yields its address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = f"127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "minisgl.cli", "serve", "--port", str(port), "--no-progress"]
    env = dict(os.environ)  # the server imports this same minisgl
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, env.get("PYTHONPATH")]))
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [*cmd, "--log-level", "WARNING", *flags], stdout=log, stderr=log, env=env
        )
        try:
            _wait_serving(target, proc, log)
            yield target
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _wait_serving(target: str, proc: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_S
    with grpc.insecure_channel(target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"server exited:\n{log.read().decode(errors='replace')}")
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not SERVING after {STARTUP_S:.0f} s")
            time.sleep(0.1)


def grpc_ttft(target: str, max_new_tokens: int, runs: int, warmup: int) -> list[float]:
    """Seconds from each sequential StreamGenerate call to its first message."""
    out: list[float] = []
    with grpc.insecure_channel(target) as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)
        req = _request(PROMPT, max_new_tokens)
        for i in range(warmup + runs):
            t = time.perf_counter()
            ttft = 0.0
            for _ in stub.StreamGenerate(req, timeout=120):  # to the end before the next one
                ttft = ttft or time.perf_counter() - t
            if i >= warmup:
                out.append(ttft)
    return out


def offline_ttft(llm: Any, max_new_tokens: int, runs: int, warmup: int) -> list[float]:
    """Seconds from LLM.submit to the step that gives the request its first token."""
    from minisgl.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    out: list[float] = []
    for i in range(warmup + runs):
        t = time.perf_counter()
        rid = llm.submit(PROMPT, params)
        done = False
        while not done:
            done = any(o.rid == rid for o in llm.step())
            pending = llm._pending.get(rid)
            if done or (pending is not None and pending.token_ids):
                break
        ttft = time.perf_counter() - t
        while llm.has_unfinished():
            llm.step()
        if i >= warmup:
            out.append(ttft)
    return out


async def _grpc_throughput(
    target: str, streams: int, tokens: int, repeats: int
) -> list[tuple[int, float]]:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = generation_pb2_grpc.GenerationServiceStub(ch)

        async def one(i: int) -> int:
            req = _request(f"stream {i}: {PROMPT}", tokens, ignore_eos=True)
            n = 0
            async for msg in stub.StreamGenerate(req, timeout=600):
                n += len(msg.token_ids)
            return n

        await asyncio.gather(*(one(-1 - i) for i in range(4)))  # warm-up
        out = []
        for r in range(repeats):
            t = time.perf_counter()
            counts = await asyncio.gather(*(one(r * streams + i) for i in range(streams)))
            out.append((sum(counts), time.perf_counter() - t))
        return out


def offline_throughput(
    llm: Any, streams: int, tokens: int, repeats: int
) -> list[tuple[int, float]]:
    from minisgl.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=tokens, ignore_eos=True)
    llm.generate([f"stream {-1 - i}: {PROMPT}" for i in range(4)], params)
    out = []
    for r in range(repeats):
        t = time.perf_counter()
        prompts = [f"stream {r * streams + i}: {PROMPT}" for i in range(streams)]
        outs = llm.generate(prompts, params)
        out.append((sum(len(o.token_ids) for o in outs), time.perf_counter() - t))
    return out


def _rates(runs: list[tuple[int, float]]) -> list[float]:
    return [round(n / wall, 1) for n, wall in runs]


def _ms(xs: list[float]) -> float:
    return round(1e3 * statistics.median(xs), 3)


def measure(
    target: str,
    max_new_tokens: list[int],
    runs: int,
    warmup: int,
    streams: int,
    tokens: int,
    repeats: int,
) -> dict[str, Any]:
    grpc_side = {m: grpc_ttft(target, m, runs, warmup) for m in max_new_tokens}
    grpc_rates = _rates(asyncio.run(_grpc_throughput(target, streams, tokens, repeats)))

    from minisgl.llm import LLM

    llm = LLM(None, progress=False)
    offline_side = {m: offline_ttft(llm, m, runs, warmup) for m in max_new_tokens}
    offline_rates = _rates(offline_throughput(llm, streams, tokens, repeats))
    ttft = {
        f"max_new_tokens={m}": {
            "grpc_median_ms": _ms(grpc_side[m]),
            "offline_median_ms": _ms(offline_side[m]),
            "added_ms": round(_ms(grpc_side[m]) - _ms(offline_side[m]), 3),
            "grpc_p90_ms": round(1e3 * statistics.quantiles(grpc_side[m], n=10)[-1], 3),
        }
        for m in max_new_tokens
    }
    return {
        "ttft": ttft,
        "ttft_runs": runs,
        "throughput": {
            "streams": streams,
            "tokens_per_stream": tokens,
            "repeats": repeats,
            "grpc_tokens_per_s_median": statistics.median(grpc_rates),
            "offline_tokens_per_s_median": statistics.median(offline_rates),
            "grpc_tokens_per_s": grpc_rates,
            "offline_tokens_per_s": offline_rates,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--target", help="host:port of a running server (default: start one)")
    ap.add_argument("--max-new-tokens", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--runs", type=int, default=50, help="sequential requests per TTFT figure")
    ap.add_argument("--warmup", type=int, default=5, help="requests before timing")
    ap.add_argument("--streams", type=int, default=64, help="concurrent streams for (b)")
    ap.add_argument("--stream-tokens", type=int, default=64, help="tokens per stream for (b)")
    ap.add_argument("--repeats", type=int, default=5, help="timed batches for (b)")
    args = ap.parse_args()
    opts = (
        args.max_new_tokens,
        args.runs,
        args.warmup,
        args.streams,
        args.stream_tokens,
        args.repeats,
    )
    if args.target:
        result = measure(args.target, *opts)
    else:
        with local_server([]) as target:
            result = measure(target, *opts)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
