"""Attention test cases: a one-layer ForwardBatch over random pages, the float32 torch reference,
and per-dtype tolerances. Shared by the CPU interpreter tests (tests/unit/test_triton_attention.py)
and the GPU tests; this module never imports triton."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from minisgl.attention.base import AttentionBackend
from minisgl.attention.batch import ForwardBatch
from minisgl.attention.torch_backend import TorchAttention


@dataclass
class AttnCase:
    batch: ForwardBatch
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def make_case(
    seq_lens: list[int],
    extend_lens: list[int],
    *,
    page_size: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> AttnCase:
    """A one-layer ForwardBatch over random, non-contiguous pages, with its new q/k/v.

    Every cache slot that the step must not read (unused pages, page tails past seq_len, and the
    slots the new tokens are about to be stored in) holds NaN, so reading one shows up in the
    output. Page 0 is finite and never assigned: the torch reference gathers slot 0 for padding.
    Unused page-table entries are -1.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    bsz = len(seq_lens)
    pages_per_req = [math.ceil(s / page_size) for s in seq_lens]
    num_pages = 1 + sum(pages_per_req) + 3  # page 0 + used + a few never-used pages
    max_pages = max(pages_per_req) + 1
    page_ids = 1 + torch.randperm(num_pages - 1, generator=cpu_gen)
    num_rows = bsz + 3
    req_rows = torch.randperm(num_rows, generator=cpu_gen)[:bsz]
    page_table = torch.full((num_rows, max_pages), -1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(pages_per_req):
        page_table[req_rows[i], :n] = page_ids[used : used + n].to(torch.int32)
        used += n

    def slots_of(i: int, start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        return page_table[req_rows[i], pos // page_size].long() * page_size + pos % page_size

    cached = torch.cat(
        [slots_of(i, 0, s - e) for i, (s, e) in enumerate(zip(seq_lens, extend_lens, strict=True))]
    )
    out_slots = torch.cat(
        [slots_of(i, s - e, s) for i, (s, e) in enumerate(zip(seq_lens, extend_lens, strict=True))]
    )
    positions = torch.cat(
        [torch.arange(s - e, s) for s, e in zip(seq_lens, extend_lens, strict=True)]
    )
    num_slots = num_pages * page_size
    readable = torch.zeros(num_slots, dtype=torch.bool)
    readable[:page_size] = True
    readable[cached] = True

    def cache() -> torch.Tensor:
        c = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen, device=device)
        c[~readable.to(device)] = float("nan")
        return c.to(dtype)

    k_cache, v_cache = cache(), cache()
    tokens = sum(extend_lens)

    def new(heads: int) -> torch.Tensor:
        return torch.randn(tokens, heads, head_dim, generator=gen, device=device).to(dtype)

    q, k, v = new(num_q_heads), new(num_kv_heads), new(num_kv_heads)

    def dev(x: torch.Tensor, dt: torch.dtype = torch.int64) -> torch.Tensor:
        return x.to(device=device, dtype=dt)

    batch = ForwardBatch(
        input_ids=dev(torch.zeros(tokens)),
        positions=dev(positions),
        out_slots=dev(out_slots),
        req_rows=dev(req_rows),
        page_table=dev(page_table, torch.int32),
        seq_lens=dev(torch.tensor(seq_lens), torch.int32),
        extend_lens=dev(torch.tensor(extend_lens), torch.int32),
        seq_lens_cpu=list(seq_lens),
        extend_lens_cpu=list(extend_lens),
        page_size=page_size,
        k_caches=[k_cache],
        v_caches=[v_cache],
        attn=TorchAttention(head_dim**-0.5),
    )
    return AttnCase(batch, q, k, v)


def reference(case: AttnCase, per_request: bool = False) -> torch.Tensor:
    """TorchAttention in float32 over float32 copies of the case's inputs (caches untouched).

    per_request runs one request at a time: TorchAttention pads every request to the longest
    extend and sequence length, which does not fit in memory for a long chunk among many decodes.
    """
    b = case.batch
    k_cache, v_cache = b.k_caches[0].float(), b.v_caches[0].float()
    head_dim = case.q.shape[-1]
    parts = [(0, b.batch_size)]
    if per_request:
        parts = [(i, i + 1) for i in range(b.batch_size)]
    outs = []
    starts = [0]
    for n in b.extend_lens_cpu:
        starts.append(starts[-1] + n)
    for lo, hi in parts:
        t0, t1 = starts[lo], starts[hi]
        sub = dataclasses.replace(
            b,
            input_ids=b.input_ids[t0:t1],
            positions=b.positions[t0:t1],
            out_slots=b.out_slots[t0:t1],
            req_rows=b.req_rows[lo:hi],
            seq_lens=b.seq_lens[lo:hi],
            extend_lens=b.extend_lens[lo:hi],
            seq_lens_cpu=b.seq_lens_cpu[lo:hi],
            extend_lens_cpu=b.extend_lens_cpu[lo:hi],
            k_caches=[k_cache],
            v_caches=[v_cache],
        )
        ref = TorchAttention(head_dim**-0.5)
        ref.prepare(sub)
        q, k, v = (x[t0:t1].float() for x in (case.q, case.k, case.v))
        outs.append(ref.forward(q, k, v, 0, sub))
    return torch.cat(outs)


def run_backend(backend: AttentionBackend, case: AttnCase) -> torch.Tensor:
    """prepare + forward for layer 0, as the model runner would (mutates the case's caches)."""
    case.batch.attn = backend
    backend.prepare(case.batch)
    return backend.forward(case.q, case.k, case.v, 0, case.batch)


TOLERANCE = {
    torch.float32: 1e-4,
    torch.float16: 4e-3,
    torch.bfloat16: 2e-2,
}
"""atol = rtol against the float32 reference on the same (rounded) inputs: float32 allows for
summation order and exp2; the 16-bit types for the output rounding and the probabilities being
rounded to the input type before the P @ V product."""
