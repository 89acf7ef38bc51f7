"""Offline benchmarks (workloads W1-W4 and W6, see WORKLOADS), with dummy weights and random
prompts.

    python -m minisgl.bench.offline --workload W2 --model qwen3-0.6b --hf-baseline
    python -m minisgl.bench.offline --workload W4 --model llama-3.1-8b --json out.json

Prints a table and (with --json) writes every figure: output tok/s, wall time, the card's
measured copy bandwidth and, for W4, decode tok/s as a share of the HBM roofline.
Engine flags (--disable-radix-cache, --chunked-prefill-size, --attention-backend, ...) are
passed through, so each optimisation can be switched off for ablations.

    python -m minisgl.bench.offline --workload W2 --model qwen3-0.6b --dummy-weights \
        --ablate=--disable-cuda-graph --ablate="--chunked-prefill-size 512" --plot ablation.png

--ablate FLAGS (repeatable; write it with `=`, as the value starts with a dash) runs the
benchmark once with the other flags given ("base") and once per FLAGS added to them, each
variant in its own process, and reports a variant each; --plot draws their output tok/s as bars
(with --hf-baseline, run alongside the base, as one more bar) as a PNG (the `plot` extra).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from minisgl.bench import report
from minisgl.bench.plot import exit_unless_plottable, plot_ablation
from minisgl.cli import add_engine_args, engine_options
from minisgl.layers.moe import Experts
from minisgl.llm import LLM
from minisgl.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workload:
    """Prompt and output lengths (inclusive ranges) and sampling of one benchmark."""

    name: str
    num_prompts: int
    input_len: tuple[int, int]
    output_len: tuple[int, int]
    temperature: float
    shared_prefix: int = 0  # tokens of a prefix shared by each group of `group` prompts
    group: int = 1


WORKLOADS = {
    "W1": Workload("W1", 256, (100, 1024), (100, 1024), 0.6),
    "W2": Workload("W2", 256, (512, 512), (256, 256), 0.0),
    "W3": Workload("W3", 500, (1, 4096), (1, 2048), 0.0),
    "W4": Workload("W4", 1, (256, 256), (1024, 1024), 0.0),
    # W6: 64 groups x 16 prompts; each group shares a 2048-token system prompt, then a
    # 128-token question (input_len is the question, shared_prefix the system prompt).
    "W6": Workload("W6", 64 * 16, (128, 128), (256, 256), 0.0, shared_prefix=2048, group=16),
}


#: Phases of a run by the number of running requests at a step (first match, top down).
PHASES = {"running>=192": 192, "running 64-191": 64, "running 16-63": 16, "running<16": 0}


def make_requests(w: Workload, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) pairs, reproducible from the seed."""
    rng = random.Random(seed)
    out = []
    prefix: list[int] = []
    for i in range(w.num_prompts):
        if i % w.group == 0:
            prefix = [rng.randrange(10, vocab - 10) for _ in range(w.shared_prefix)]
        n_in = rng.randint(*w.input_len)
        n_out = rng.randint(*w.output_len)
        out.append((prefix + [rng.randrange(10, vocab - 10) for _ in range(n_in)], n_out))
    return out


def copy_bandwidth(device: torch.device, gib: float = 1.0) -> float:
    """Device-to-device copy rate in bytes/s, counting read + write."""
    if device.type != "cuda":
        return float("nan")
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    reps = 20
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    return 2 * src.numel() * src.element_size() * reps / (time.perf_counter() - t)


def _record_batches(llm: LLM, keep: int = 8) -> deque[tuple[int, int, int, int, int, str]]:
    """Note each forward batch (the last `keep` kept) for a post-mortem of a failed run:
    (forward number, requests, decoding, prefill tokens, longest sequence, graph | eager)."""
    recent: deque[tuple[int, int, int, int, int, str]] = deque(maxlen=keep)
    runner = llm.runner
    forward, graphs = runner.forward, runner.graphs
    count = 0

    def noted(batch: Any) -> torch.Tensor:
        nonlocal count
        count += 1
        ext = batch.extend_lens_cpu
        decode = ext.count(1)
        path = "graph" if graphs is not None and graphs.can_run(batch) else "eager"
        recent.append((count, len(ext), decode, sum(ext) - decode, max(batch.seq_lens_cpu), path))
        return forward(batch)

    runner.forward = noted  # type: ignore[method-assign]
    return recent


def run_ours(
    llm: LLM, reqs: list[tuple[list[int], int]], temperature: float, json_schema: str | None = None
) -> dict[str, Any]:
    """`json_schema`: every request constrained by it (it then ends where its JSON does)."""
    params = [
        SamplingParams(
            temperature=temperature,
            max_new_tokens=n,
            ignore_eos=True,
            seed=i,
            json_schema=json_schema,
        )
        for i, (_, n) in enumerate(reqs)
    ]
    prompts: list[Any] = [p for p, _ in reqs]
    # Warm up with a few short requests (compilation, graph capture stay out of the timing).
    warm = SamplingParams(max_new_tokens=8, ignore_eos=True, json_schema=json_schema)
    llm.generate(prompts[:4], warm)
    llm.scheduler.release_all_cache()
    before = llm.scheduler.stats()
    sync(llm.runner.device)
    t = time.perf_counter()
    first_token_at: float | None = None
    rids = [llm.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
    done = 0
    generated = 0
    # Wall time by running-batch size: where the run spends its time (full batch vs tail).
    phases = {name: [0, 0.0] for name in PHASES}
    slowest: list[tuple[float, int]] = []
    last = t
    recent = _record_batches(llm)
    while done < len(rids):
        running = len(llm.scheduler.running)
        try:
            outs = llm.step()
        except Exception:
            # A CUDA error surfaces a step or two after the kernel that caused it.
            log.error("the run failed; the last forward batches, oldest first:")
            for n, reqs_, decode, prefill, longest, path in recent:
                log.error(
                    "  forward %d: %d requests (%d decoding, %d prefill tokens), "
                    "longest sequence %d, %s",
                    n, reqs_, decode, prefill, longest, path,
                )  # fmt: skip
            raise
        now = time.perf_counter()
        if first_token_at is None and (outs or any(r.output_ids for r in llm.scheduler.running)):
            first_token_at = now
        phase = phases[next(name for name, low in PHASES.items() if running >= low)]
        phase[0] += 1
        phase[1] += now - last
        slowest.append((now - last, running))
        last = now
        done += len(outs)
        generated += sum(len(o.token_ids) for o in outs)
    sync(llm.runner.device)
    wall = time.perf_counter() - t
    ttft = (first_token_at or t) - t
    after = llm.scheduler.stats()
    prompt_tokens = after.prompt_tokens - before.prompt_tokens
    return {
        "cached_tokens": after.cached_tokens - before.cached_tokens,
        "cache_hit_rate": (after.cached_tokens - before.cached_tokens) / max(1, prompt_tokens),
        "computed_tokens": after.computed_tokens - before.computed_tokens,
        "retractions": after.retractions - before.retractions,
        "wall_s": wall,
        "output_tokens": generated,
        "output_tok_s": generated / wall,
        "ttft_s": ttft,
        "decode_tok_s_batch1": (generated - 1) / (wall - ttft) if len(reqs) == 1 else None,
        "steps": sum(n for n, _ in phases.values()),
        "slowest_steps_ms_running": [
            (round(1e3 * d, 2), n) for d, n in sorted(slowest, reverse=True)[:10]
        ],
        "phases": {
            name: {"steps": n, "wall_s": round(s, 3), "ms_per_step": round(1e3 * s / max(1, n), 3)}
            for name, (n, s) in phases.items()
        },
    }


def decode_weight_bytes(model: torch.nn.Module, top_k: int) -> int:
    """Bytes of weights a batch-1 decode step reads: every parameter once, except that a
    mixture-of-experts layer reads only the `top_k` experts its one token is routed to
    (top_k / E of its stacked expert weights; the router is read in full)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            size = p.numel() * p.element_size()
            if isinstance(module, Experts):
                size = size * top_k // module.num_experts
            total += size
    return total


def run_hf(
    model_name: str, reqs: list[tuple[list[int], int]], device: torch.device
) -> dict[str, Any]:
    """HF transformers continuous batching (generate_batch, paged|sdpa) on the same prompts."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from minisgl.models.source import PRESETS_DIR

    cfg = AutoConfig.from_pretrained(str(PRESETS_DIR / f"{model_name}.json"))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            cfg, dtype=torch.bfloat16, attn_implementation="paged|sdpa"
        ).eval()
    n_out = reqs[0][1]
    assert all(n == n_out for _, n in reqs), "the HF baseline needs one output length"
    gen = GenerationConfig(max_new_tokens=n_out, do_sample=False, eos_token_id=-1, pad_token_id=0)
    prompts = [p for p, _ in reqs]
    model.generate_batch(inputs=prompts[:4], generation_config=gen)
    sync(device)
    t = time.perf_counter()
    results = model.generate_batch(inputs=prompts, generation_config=gen)
    sync(device)
    wall = time.perf_counter() - t
    generated = sum(len(r.generated_tokens) for r in results.values())
    del model
    torch.cuda.empty_cache()
    return {"wall_s": wall, "output_tokens": generated, "output_tok_s": generated / wall}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: Flags of ours that the variants of an ablation do not get (value-taking ones first).
_VARIANT_DROPS = {"--ablate": True, "--plot": True, "--json": True, "--hf-baseline": False}


def _variant_argv(argv: list[str]) -> list[str]:
    """`argv` without the ablation's own flags (`--flag value` and `--flag=value` forms)."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        name = arg.split("=", 1)[0]
        if name in _VARIANT_DROPS:
            if _VARIANT_DROPS[name] and "=" not in arg:
                next(it, None)
            continue
        out.append(arg)
    return out


def run_ablation(argv: list[str], ablations: list[str], hf_baseline: bool) -> dict[str, Any]:
    """The benchmark in a fresh process with `argv`'s other flags ("base", plus --hf-baseline
    when asked) and once per ablation's flags added to them; each result under "variants"."""
    base = _variant_argv(argv)
    env = dict(os.environ)  # the variants import this same minisgl
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    variants: list[dict[str, Any]] = []
    for label, extra in [("base", []), *((a, shlex.split(a)) for a in ablations)]:
        if label == "base" and hf_baseline:
            extra = ["--hf-baseline"]
        with tempfile.TemporaryDirectory() as tmp:
            out = f"{tmp}/result.json"
            cmd = [sys.executable, "-m", "minisgl.bench.offline", *base, *extra, "--json", out]
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, env=env)
            if proc.returncode != 0:
                sys.exit(f"error: --ablate: the variant {label!r} failed (exit {proc.returncode})")
            with open(out) as f:
                result = json.load(f)
        variants.append(
            {"label": label, "flags": extra, "output_tok_s": result["minisgl"]["output_tok_s"],
             "result": result}
        )  # fmt: skip
    first = variants[0]["result"]
    return {k: first[k] for k in ("workload", "model", "device")} | {"variants": variants}


def _bars(result: dict[str, Any]) -> list[tuple[str, float]]:
    """(label, output tok/s) per variant of an ablation or a single run, HF's last."""
    variants = result.get("variants") or [{"label": "base", "result": result}]
    bars = [(v["label"], v["result"]["minisgl"]["output_tok_s"]) for v in variants]
    hf = variants[0]["result"].get("hf")
    return bars + ([("HF generate_batch", hf["output_tok_s"])] if hf else [])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False
    )
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="W2")
    ap.add_argument("--num-prompts", type=int, default=None, help="override the workload's count")
    ap.add_argument("--hf-baseline", action="store_true", help="also run HF generate_batch")
    ap.add_argument("--json", default=None, help="write the results to this file")
    ap.add_argument("--log-level", default="WARNING")
    ap.add_argument(
        "--ablate",
        action="append",
        default=[],
        metavar="FLAGS",
        help="a variant: these engine flags added to the others (repeatable; --ablate=FLAGS)",
    )
    ap.add_argument("--plot", default=None, metavar="PNG", help="output tok/s per variant, bars")
    ap.add_argument(
        "--json-schema",
        default=None,
        metavar="FILE",
        help="constrain every request by the JSON schema in FILE (structured output)",
    )
    add_engine_args(ap)
    args = ap.parse_args()
    logging.basicConfig(level=args.log_level.upper())
    if any(not shlex.split(a) for a in args.ablate):
        ap.error("--ablate: a variant needs at least one engine flag")
    if args.plot:
        exit_unless_plottable()
    if args.ablate:
        result = run_ablation(sys.argv[1:], args.ablate, args.hf_baseline)
    else:
        result = run_one(args)
    report(result, args.json)
    if args.plot:
        w = result["workload"]
        model = result["model"] or "demo model"
        prompts = f"{w['num_prompts']} prompt{'s' if w['num_prompts'] != 1 else ''}"
        title = f"{w['name']} ({prompts}), {model} on {result['device']}"
        plot_ablation(_bars(result), args.plot, title + "\noutput throughput per variant")


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """One run in this process with the parsed flags; the result that --json writes."""
    w = WORKLOADS[args.workload]
    if args.num_prompts:
        w = dataclasses.replace(w, num_prompts=args.num_prompts)
    opts = engine_options(args)
    llm = LLM(args.model, **opts)
    reqs = make_requests(w, llm.runner.model_config.vocab_size)
    device = llm.runner.device
    result: dict[str, Any] = {
        "workload": asdict(w),
        "model": args.model,
        "engine": {k: v for k, v in opts.items() if k != "progress"},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "copy_bandwidth_gb_s": copy_bandwidth(device) / 1e9,
        "weight_gb": llm.runner.weight_bytes() / 1e9,
    }
    schema = Path(args.json_schema).read_text() if args.json_schema else None
    result["json_schema"] = args.json_schema
    result["minisgl"] = run_ours(llm, reqs, w.temperature, schema)
    if w.name == "W4":
        mc = llm.runner.model_config
        avg_ctx = w.input_len[0] + w.output_len[0] / 2
        kv_bytes = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * 2 * avg_ctx
        # Dense: all the weights. MoE: the routed experts' share of the experts' weights.
        weights_read = decode_weight_bytes(llm.runner.model, mc.num_experts_per_tok)
        result["decode_weight_gb"] = weights_read / 1e9
        step_bytes = weights_read + kv_bytes
        roofline = result["copy_bandwidth_gb_s"] * 1e9 / step_bytes
        result["roofline_tok_s"] = roofline
        result["roofline_pct"] = 100 * result["minisgl"]["decode_tok_s_batch1"] / roofline
    if args.hf_baseline:
        del llm
        torch.cuda.empty_cache()
        result["hf"] = run_hf(args.model, reqs, device)
        result["speedup_vs_hf"] = result["minisgl"]["output_tok_s"] / result["hf"]["output_tok_s"]
    return result


if __name__ == "__main__":
    main()
