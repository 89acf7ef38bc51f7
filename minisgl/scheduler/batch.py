"""Turn the scheduler's plan into the tensors a forward step and the sampler need."""

from __future__ import annotations

from typing import Any

import torch

from minisgl.attention.base import AttentionBackend, ForwardBatch
from minisgl.engine.sampler import Penalties, SamplingBatch
from minisgl.kvcache.pool import KVPool
from minisgl.scheduler.request import Req
from minisgl.transfer import HostToDevice

#: Triton compiles a kernel once per combination of its pointer arguments being 16-byte aligned
#: or not; a view into a packed buffer at an odd offset would make kernels compile again in the
#: middle of a run (a second or more each) the first time a batch shape hits a new combination.
#: So every list packed by `_pack` starts at a multiple of 16 bytes.
_ALIGN_BYTES = 16


def _padded(values: list[Any], multiple: int) -> list[Any]:
    return values + [0] * (-len(values) % multiple)


def _pack(
    parts: tuple[list[Any], ...], dtype: torch.dtype, device: torch.device, h2d: HostToDevice
) -> list[torch.Tensor]:
    """Several lists in one host-to-device copy: a view per list, each 16-byte aligned."""
    multiple = _ALIGN_BYTES // torch.empty(0, dtype=dtype).element_size()
    packed = h2d([x for part in parts for x in _padded(part, multiple)], dtype, device)
    views, start = [], 0
    for part in parts:
        views.append(packed[start : start + len(part)])
        start += len(part) + (-len(part) % multiple)
    return views


def resolve_placeholders(ids: torch.Tensor, future: torch.Tensor | None) -> torch.Tensor:
    """Replace placeholder ids (-1 - slot) by the tokens a previous step wrote to `future`."""
    if future is None:
        return ids
    return torch.where(ids < 0, future[(-1 - ids).clamp(min=0)], ids)


def build_forward_batch(
    plan: list[tuple[Req, int]],
    page_table: torch.Tensor,
    pool: KVPool,
    attn: AttentionBackend,
    h2d: HostToDevice,
    future: torch.Tensor | None = None,
) -> ForwardBatch:
    """A ForwardBatch computing `n` new tokens of each (req, n); pages must be in place.

    Token ids not yet read back from the GPU are placeholders, resolved from `future` on the
    device (see Scheduler: overlap scheduling).
    """
    ps = pool.page_size
    device = page_table.device
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    for req, n in plan:
        start, end = req.num_computed, req.num_computed + n
        input_ids += req.token_slice(start, end)
        positions += range(start, end)
        pages = req.pages
        slots += [pages[p // ps] * ps + p % ps for p in range(start, end)]
    seq_lens = [req.num_computed + n for req, n in plan]
    ext = [n for _, n in plan]
    rows = [req.row for req, _ in plan]
    # One host-to-device copy for everything, then views. The lengths travel as int64 and
    # become one int32 tensor, seq_lens padded so that extend_lens starts 16 bytes in too.
    b = len(plan)
    seq_padded = _padded(seq_lens, _ALIGN_BYTES // 4)
    ids, pos, out_slots, req_rows, lens64 = _pack(
        (input_ids, positions, slots, rows, seq_padded + ext), torch.int64, device, h2d
    )
    lens = lens64.to(torch.int32)
    return ForwardBatch(
        input_ids=resolve_placeholders(ids, future),
        positions=pos,
        out_slots=out_slots,
        req_rows=req_rows,
        page_table=page_table,
        seq_lens=lens[:b],
        extend_lens=lens[len(seq_padded) :],
        seq_lens_cpu=seq_lens,
        extend_lens_cpu=ext,
        page_size=ps,
        k_caches=pool.k_caches,
        v_caches=pool.v_caches,
        attn=attn,
    )


def build_sampling_batch(
    reqs: list[Req],
    vocab: int,
    device: torch.device,
    h2d: HostToDevice,
    future: torch.Tensor | None = None,
) -> SamplingBatch:
    """Per-row sampling tensors; penalty and ban tensors only when some request needs them."""
    params = [r.params for r in reqs]

    def padded(rows: list[list[int]]) -> torch.Tensor:
        width = max(1, max(len(r) for r in rows))
        flat = [t for r in rows for t in r + [vocab] * (width - len(r))]
        ids = h2d(flat, torch.int64, device).view(len(rows), width)
        return resolve_placeholders(ids, future)

    penalties = None
    if any(
        p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params
    ):
        repetition, presence, frequency = _pack(
            (
                [p.repetition_penalty for p in params],
                [p.presence_penalty for p in params],
                [p.frequency_penalty for p in params],
            ),
            torch.float32,
            device,
            h2d,
        )
        penalties = Penalties(
            repetition=repetition,
            presence=presence,
            frequency=frequency,
            seen_ids=padded([r.prompt_ids + r.output_ids for r in reqs]),
            output_ids=padded([r.output_ids for r in reqs]),
        )
    too_early = [len(r.output_ids) < r.params.min_new_tokens for r in reqs]
    banned = None
    if any(too_early):
        banned = padded(
            [sorted(r.stop_ids) if t else [] for r, t in zip(reqs, too_early, strict=True)]
        )
    temperature, top_p, min_p = _pack(
        ([p.temperature for p in params], [p.top_p for p in params], [p.min_p for p in params]),
        torch.float32,
        device,
        h2d,
    )
    top_k, seeds, steps = _pack(
        (
            [p.top_k if p.top_k > 0 else vocab for p in params],
            [r.seed for r in reqs],
            [len(r.output_ids) for r in reqs],
        ),
        torch.int64,
        device,
        h2d,
    )
    return SamplingBatch(
        temperature=temperature,
        top_p=top_p,
        min_p=min_p,
        top_k=top_k,
        seeds=seeds,
        steps=steps,
        all_greedy=all(p.greedy for p in params),
        use_top_k=any(0 < p.top_k < vocab and not p.greedy for p in params),
        use_top_p=any(p.top_p < 1.0 and not p.greedy for p in params),
        use_min_p=any(p.min_p > 0.0 and not p.greedy for p in params),
        penalties=penalties,
        banned_ids=banned,
        want_logprobs=any(p.logprobs for p in params),
        top_logprobs=max(p.top_logprobs for p in params),
    )
