"""Run an offline workload with device-side checks of every forward batch (for GPU debugging).

    python benchmarks/check_batches.py --workload W3 --model llama-3.1-8b [--overlap-schedule off]

Before each forward, asserts on the GPU (torch._assert_async: no host sync, so timing stays
as in a normal run) that rows, sequence lengths, positions, token ids, KV slots and the page
table entries each request will read are in range, and, for extend steps, that the Triton
backend's block list is. If a check fires, the run stops with a device-side assert naming
nothing, but *which* check fired is printed by rerunning with CUDA_LAUNCH_BLOCKING=1 (the
assert then raises at its own line). If the run dies with an illegal memory access and no
assert fired, the batch data was valid and the fault is inside a kernel.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from minisgl.attention.base import ForwardBatch
from minisgl.bench.offline import WORKLOADS, make_requests
from minisgl.llm import LLM
from minisgl.sampling_params import SamplingParams


def check(batch: ForwardBatch, vocab: int, num_slots: int, max_len: int) -> None:
    pt = batch.page_table
    ps = batch.page_size
    a = torch._assert_async
    a(((batch.req_rows >= 0) & (batch.req_rows < pt.shape[0])).all())
    a(((batch.seq_lens >= 1) & (batch.seq_lens <= min(pt.shape[1] * ps, max_len))).all())
    a(((batch.extend_lens >= 1) & (batch.extend_lens <= batch.seq_lens)).all())
    a(((batch.input_ids >= 0) & (batch.input_ids < vocab)).all())
    a(((batch.positions >= 0) & (batch.positions < max_len)).all())
    a(((batch.out_slots >= 0) & (batch.out_slots < num_slots)).all())
    rows = pt[batch.req_rows]  # [B, width]
    used = torch.arange(pt.shape[1], device=pt.device)[None, :] < (
        (batch.seq_lens[:, None] + ps - 1) // ps
    )
    a((~used | ((rows >= 0) & (rows * ps < num_slots))).all())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workload", default="W3", choices=sorted(WORKLOADS))
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--overlap-schedule", default="auto")
    ap.add_argument("--mem-fraction", type=float, default=None, help="KV pool sizing")
    ap.add_argument("--disable-cuda-graph", action="store_true")
    ap.add_argument(
        "--extend-stages", type=int, default=None, help="override the extend kernel's num_stages"
    )
    args = ap.parse_args()
    if args.extend_stages is not None:
        from minisgl.kernels import attention as kernels

        base = kernels.extend_config

        def staged(head_dim: int, dtype: torch.dtype) -> kernels.ExtendConfig:
            c = base(head_dim, dtype)
            return kernels.ExtendConfig(c.block_m, c.block_n, c.num_warps, args.extend_stages)

        kernels.extend_config = staged
    opts: dict[str, Any] = {}
    if args.mem_fraction is not None:
        opts["mem_fraction"] = args.mem_fraction
    llm = LLM(
        args.model,
        dummy_weights=True,
        progress=False,
        overlap_schedule=args.overlap_schedule,
        disable_cuda_graph=args.disable_cuda_graph,
        **opts,
    )
    sched, runner = llm.scheduler, llm.runner
    vocab = runner.model_config.vocab_size
    num_slots = sched.pool.k_caches[0].shape[0]
    forward = runner.forward

    def checked(batch: ForwardBatch) -> Any:
        check(batch, vocab, num_slots, sched.max_model_len)
        out = forward(batch)
        blocks = getattr(runner.attn, "_blocks", None)
        if not batch.is_decode and blocks is not None and blocks.numel():
            b = blocks.view(-1, 3)
            torch._assert_async(((b[:, 0] >= 0) & (b[:, 0] < batch.batch_size)).all())
        return out

    runner.forward = checked  # type: ignore[method-assign]
    w = WORKLOADS[args.workload]
    reqs = make_requests(w, vocab)
    for prompt, n in reqs:
        llm.submit(
            prompt, SamplingParams(temperature=w.temperature, max_new_tokens=n, ignore_eos=True)
        )
    t = time.perf_counter()
    steps = 0
    while llm.has_unfinished():
        llm.step()
        steps += 1
        if steps % 500 == 0:
            print(f"step {steps}: {time.perf_counter() - t:.1f} s, {sched.stats()}", flush=True)
    torch.cuda.synchronize()
    print(f"completed: {steps} steps, {time.perf_counter() - t:.1f} s, {sched.stats()}")


if __name__ == "__main__":
    main()
