"""FlashInfer smoke test for the GPU machine, against torch SDPA in float32.

Checks, on a tiny bf16 paged cache (NHD layout, page size 16, GQA, pages in random order):
the paged decode wrapper with and without tensor cores, the decode wrapper in its CUDA-graph
mode (captured once, then re-planned for other lengths and replayed, as a server does), and
the paged prefill wrapper (backend "auto", which picks fa3 on sm90, and "fa2") on a causal
extend over cached prefixes. Prints one line per check and, last, PASS or FAIL.

    . /tmp/fi_env.sh && python3 scripts/flashinfer_smoke.py
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

PAGE = 16
HQ, HKV = 32, 8
TOL = 2e-2  # bf16 output against a float32 reference


class Case:
    """Requests over a shared paged cache: request i holds seq_lens[i] tokens, of which the last
    new_lens[i] are the queries of this step."""

    def __init__(
        self,
        seq_lens: list[int],
        new_lens: list[int],
        head_dim: int,
        seed: int,
        cache: Case | None = None,
    ) -> None:
        gen = torch.Generator(device="cuda").manual_seed(seed)
        counts = [-(-n // PAGE) for n in seq_lens]
        if cache is None:
            shape = (sum(counts) + 3, PAGE, HKV, head_dim)
            self.k = torch.randn(shape, generator=gen, device="cuda").to(torch.bfloat16)
            self.v = torch.randn(shape, generator=gen, device="cuda").to(torch.bfloat16)
        else:  # another batch over the same cache tensors
            self.k, self.v = cache.k, cache.v
        num_pages = self.k.shape[0]
        assert sum(counts) <= num_pages, "the cache has too few pages for these lengths"
        order = torch.randperm(num_pages, generator=gen, device="cuda").to(torch.int32)
        self.pages: list[torch.Tensor] = []
        start = 0
        for c in counts:
            self.pages.append(order[start : start + c])
            start += c
        self.seq_lens, self.new_lens, self.head_dim = seq_lens, new_lens, head_dim
        self.indptr = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
        self.qo_indptr = torch.tensor(
            [0, *torch.tensor(new_lens).cumsum(0).tolist()], dtype=torch.int32
        )
        self.indices = torch.cat(self.pages)
        self.last = torch.tensor(
            [n - (c - 1) * PAGE for n, c in zip(seq_lens, counts, strict=True)], dtype=torch.int32
        )
        total_q = sum(new_lens)
        self.q = torch.randn(total_q, HQ, head_dim, generator=gen, device="cuda").to(torch.bfloat16)
        self.scale = head_dim**-0.5

    def reference(self) -> torch.Tensor:
        outs = []
        start = 0
        for pages, n, m in zip(self.pages, self.seq_lens, self.new_lens, strict=True):
            k = self.k[pages.long()].flatten(0, 1)[:n].float().transpose(0, 1)  # [HKV, n, D]
            v = self.v[pages.long()].flatten(0, 1)[:n].float().transpose(0, 1)
            k, v = (t.repeat_interleave(HQ // HKV, dim=0) for t in (k, v))
            q = self.q[start : start + m].float().transpose(0, 1)  # [HQ, m, D]
            pos = torch.arange(n - m, n, device="cuda")[:, None]
            mask = torch.arange(n, device="cuda")[None, :] <= pos  # causal, aligned at the end
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
            outs.append(o.transpose(0, 1))
            start += m
        return torch.cat(outs)


def compare(name: str, out: torch.Tensor, case: Case, seconds: float) -> bool:
    ref = case.reference()
    err = (out.float() - ref).abs().max().item()
    ok = out.shape == ref.shape and torch.allclose(out.float(), ref, atol=TOL, rtol=TOL)
    print(f"{'ok  ' if ok else 'BAD '} {name}: max |err| {err:.2e}, first call {seconds:.1f} s")
    return ok


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    torch.cuda.synchronize()
    t = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - t


def decode_checks(flashinfer: Any, hd: int, workspace: torch.Tensor) -> list[bool]:
    lens = [1, 17, 300, 1025]
    results = []
    for tensor_cores in (True, False):
        case = Case(lens, [1] * len(lens), hd, seed=hd)
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", use_tensor_cores=tensor_cores
        )

        def run(w: Any = w, case: Case = case) -> torch.Tensor:
            w.plan(
                case.indptr, case.indices, case.last, HQ, HKV, hd, PAGE,
                sm_scale=case.scale, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
            )  # fmt: skip
            out: torch.Tensor = w.run(case.q, (case.k, case.v))
            return out

        out, s = timed(run)
        results.append(compare(f"decode hd{hd} tensor_cores={tensor_cores}", out, case, s))

    # CUDA-graph mode: fixed batch size, buffers owned by the caller, plan before each replay.
    batch, max_pages = len(lens), 200
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace,
        "NHD",
        use_cuda_graph=True,
        use_tensor_cores=True,
        paged_kv_indptr_buffer=torch.zeros(batch + 1, dtype=torch.int32, device="cuda"),
        paged_kv_indices_buffer=torch.zeros(max_pages, dtype=torch.int32, device="cuda"),
        paged_kv_last_page_len_buffer=torch.zeros(batch, dtype=torch.int32, device="cuda"),
    )
    # Two batches over one cache (the graph reads fixed K/V tensors), the larger one first.
    second = Case([900, 5, 64, 2000], [1] * batch, hd, seed=hd + 2)
    first = Case(lens, [1] * batch, hd, seed=hd + 1, cache=second)
    assert second.indptr[-1] <= max_pages

    def plan(case: Case) -> None:
        w.plan(
            case.indptr, case.indices, case.last, HQ, HKV, hd, PAGE,
            sm_scale=case.scale, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
        )  # fmt: skip

    q_static = first.q.clone()
    plan(first)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        w.run(q_static, (second.k, second.v))  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = w.run(q_static, (second.k, second.v))
    ok = True
    for case in (first, second):
        plan(case)
        q_static.copy_(case.q)
        out_static.fill_(float("nan"))
        _, s = timed(graph.replay)
        ok = compare(f"decode hd{hd} cuda graph, replay of {case.seq_lens}", out_static, case, s)
        results.append(ok)
    if ok:
        _, s = timed(lambda: [graph.replay() for _ in range(100)])
        print(f"     decode hd{hd} cuda graph replay: {s * 1e4:.1f} us per call (batch {batch})")
    return results


def prefill_checks(flashinfer: Any, hd: int, workspace: torch.Tensor) -> list[bool]:
    results = []
    for backend in ("auto", "fa2"):
        case = Case([40, 129, 7, 513, 300], [40, 72, 7, 1, 299], hd, seed=hd + 3)
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend)

        def run(w: Any = w, case: Case = case) -> torch.Tensor:
            w.plan(
                case.qo_indptr, case.indptr, case.indices, case.last, HQ, HKV, hd, PAGE,
                causal=True, sm_scale=case.scale,
                q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
            )  # fmt: skip
            out: torch.Tensor = w.run(case.q, (case.k, case.v))
            return out

        out, s = timed(run)
        picked = getattr(w, "_backend", backend)
        results.append(compare(f"prefill hd{hd} backend={backend} ({picked})", out, case, s))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", default="128,64", help="comma-separated (default 128,64)")
    args = parser.parse_args()
    try:
        import flashinfer

        print(f"flashinfer {flashinfer.__version__} on {torch.cuda.get_device_name()}")
        workspace = torch.zeros(128 * 2**20, dtype=torch.uint8, device="cuda")
        results = []
        for hd in (int(h) for h in args.head_dims.split(",")):
            for checks in (decode_checks, prefill_checks):
                try:
                    results += checks(flashinfer, hd, workspace)
                except Exception as e:  # one failing path must not hide the others
                    print(f"BAD  {checks.__name__} hd{hd}: {type(e).__name__}: {e}"[:2000])
                    results.append(False)
    except Exception as e:
        print(f"FAIL: {type(e).__name__}: {e}"[:2000])
        return 1
    passed = all(results) and bool(results)
    print(f"{'PASS' if passed else 'FAIL'}: {sum(results)} of {len(results)} checks")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
