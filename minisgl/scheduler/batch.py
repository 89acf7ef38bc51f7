"""Turn the scheduler's plan into the tensors a forward step and the sampler need."""

from __future__ import annotations

import torch

from minisgl.attention.base import AttentionBackend, ForwardBatch
from minisgl.engine.sampler import Penalties, SamplingBatch
from minisgl.kvcache.pool import KVPool
from minisgl.scheduler.request import Req
from minisgl.transfer import HostToDevice


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
    # One host-to-device copy for everything, then views.
    t, b = len(input_ids), len(plan)
    packed = h2d(input_ids + positions + slots + rows + seq_lens + ext, torch.int64, device)
    lens = packed[3 * t + b :].to(torch.int32)
    return ForwardBatch(
        input_ids=resolve_placeholders(packed[:t], future),
        positions=packed[t : 2 * t],
        out_slots=packed[2 * t : 3 * t],
        req_rows=packed[3 * t : 3 * t + b],
        page_table=page_table,
        seq_lens=lens[:b],
        extend_lens=lens[b:],
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

    def floats(values: list[float]) -> torch.Tensor:
        return h2d(values, torch.float32, device)

    def padded(rows: list[list[int]]) -> torch.Tensor:
        width = max(1, max(len(r) for r in rows))
        flat = [t for r in rows for t in r + [vocab] * (width - len(r))]
        ids = h2d(flat, torch.int64, device).view(len(rows), width)
        return resolve_placeholders(ids, future)

    penalties = None
    if any(
        p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params
    ):
        penalties = Penalties(
            repetition=floats([p.repetition_penalty for p in params]),
            presence=floats([p.presence_penalty for p in params]),
            frequency=floats([p.frequency_penalty for p in params]),
            seen_ids=padded([r.prompt_ids + r.output_ids for r in reqs]),
            output_ids=padded([r.output_ids for r in reqs]),
        )
    too_early = [len(r.output_ids) < r.params.min_new_tokens for r in reqs]
    banned = None
    if any(too_early):
        banned = padded(
            [sorted(r.stop_ids) if t else [] for r, t in zip(reqs, too_early, strict=True)]
        )
    b = len(reqs)
    fl = h2d(
        [p.temperature for p in params] + [p.top_p for p in params] + [p.min_p for p in params],
        torch.float32,
        device,
    )
    it = h2d(
        [p.top_k if p.top_k > 0 else vocab for p in params]
        + [r.seed for r in reqs]
        + [len(r.output_ids) for r in reqs],
        torch.int64,
        device,
    )
    return SamplingBatch(
        temperature=fl[:b],
        top_p=fl[b : 2 * b],
        min_p=fl[2 * b :],
        top_k=it[:b],
        seeds=it[b : 2 * b],
        steps=it[2 * b :],
        all_greedy=all(p.greedy for p in params),
        use_top_k=any(0 < p.top_k < vocab and not p.greedy for p in params),
        use_top_p=any(p.top_p < 1.0 and not p.greedy for p in params),
        use_min_p=any(p.min_p > 0.0 and not p.greedy for p in params),
        penalties=penalties,
        banned_ids=banned,
        want_logprobs=any(p.logprobs for p in params),
        top_logprobs=max(p.top_logprobs for p in params),
    )
