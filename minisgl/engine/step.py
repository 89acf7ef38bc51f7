"""What the scheduler hands the engine for one step (plain host lists), and how the engine turns
it into device tensors.

The scheduler never touches a device tensor. A step is launched in two halves: the scheduler
sends a `StepPlan` and gets a `PendingStep` back (the forward queued; the scheduler only hands
it back), then hands that over with the step's structured-output bitmask (a host tensor, which
xgrammar's matchers fill in place; None without constrained rows) and gets a `LaunchedStep`,
whose `read` waits for the sampled tokens and returns them as host lists.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from minisgl.attention.base import AttentionBackend
from minisgl.attention.batch import ForwardBatch
from minisgl.engine.sampler import Penalties, SampleOutput, SamplingBatch
from minisgl.kvcache.pool import KVPool
from minisgl.transfer import HostToDevice

#: Triton compiles a kernel once per combination of its pointer arguments being 16-byte aligned
#: or not; a view into a packed buffer at an odd offset would make kernels compile again in the
#: middle of a run (a second or more each) the first time a batch shape hits a new combination.
#: So every list packed by `_pack` starts at a multiple of 16 bytes.
_ALIGN_BYTES = 16


@dataclass
class PenaltyPlan:
    repetition: list[float]
    presence: list[float]
    frequency: list[float]
    seen_ids: list[list[int]]  # prompt + output ids of each row
    output_ids: list[list[int]]


@dataclass
class SamplingPlan:
    """Per-row sampling options; `penalties` and `banned_ids` only when some row needs them."""

    temperature: list[float]
    top_p: list[float]
    min_p: list[float]
    top_k: list[int]  # vocab_size where disabled
    seeds: list[int]
    steps: list[int]  # tokens generated so far
    all_greedy: bool
    use_top_k: bool
    use_top_p: bool
    use_min_p: bool
    penalties: PenaltyPlan | None
    banned_ids: list[list[int]] | None
    want_logprobs: bool
    top_logprobs: int
    # The largest top_k among sampled rows with top-k or top-p on (vocab for top-p alone); 0
    # when no row cuts. The GPU sampler takes that many candidates per row.
    max_top_k: int = 0


@dataclass
class StepPlan:
    """One step: page-table writes, then the new tokens of each row (flattened, row after row).

    Token ids may be placeholders (-1 - slot) for ids sampled by an earlier step and not read
    back yet; the engine resolves them on the device.
    """

    table_writes: dict[tuple[int, int], int]  # (row, column) -> page
    input_ids: list[int]
    positions: list[int]
    out_slots: list[int]
    req_rows: list[int]
    seq_lens: list[int]
    extend_lens: list[int]
    sampling: SamplingPlan


@dataclass
class PendingStep:
    """A step whose forward is queued on the device, its sampling not yet (see
    `ModelRunner.launch_forward`)."""

    first_slot: int  # row i's token will be written to `future[first_slot + i]` (with overlap)
    logits: torch.Tensor  # [B, vocab] on the device, once the forward has run
    sampling: SamplingBatch  # on the device, without the structured-output bitmask


@dataclass
class LaunchedStep:
    """A step whose forward and sampling are queued on the device."""

    first_slot: int  # row i's token is written to `future[first_slot + i]` (with overlap)
    sampled: SampleOutput  # host copies (pinned on CUDA), valid once `ready` has fired
    ready: torch.cuda.Event | None

    def read(self) -> tuple[list[int], list[float] | None, list[Any] | None, list[Any] | None]:
        """Wait for the tokens: ids, logprobs, top ids and top logprobs per row."""
        if self.ready is not None:
            self.ready.synchronize()
        out = self.sampled
        return (
            out.token_ids.tolist(),
            out.logprobs.tolist() if out.logprobs is not None else None,
            out.top_ids.tolist() if out.top_ids is not None else None,
            out.top_logprobs.tolist() if out.top_logprobs is not None else None,
        )


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


def write_page_table(
    page_table: torch.Tensor, writes: dict[tuple[int, int], int], h2d: HostToDevice
) -> None:
    if not writes:
        return
    n = len(writes)
    rows, cols = zip(*writes, strict=True)
    packed = h2d([*rows, *cols, *writes.values()], torch.int64, page_table.device)
    page_table[packed[:n], packed[n : 2 * n]] = packed[2 * n :].to(torch.int32)


def forward_batch(
    plan: StepPlan,
    page_table: torch.Tensor,
    pool: KVPool,
    attn: AttentionBackend,
    h2d: HostToDevice,
    future: torch.Tensor | None,
) -> ForwardBatch:
    """The ForwardBatch of a plan (its pages in place)."""
    device = page_table.device
    # One host-to-device copy for everything, then views. The lengths travel as int64 and
    # become one int32 tensor, seq_lens padded so that extend_lens starts 16 bytes in too.
    b = len(plan.seq_lens)
    seq_padded = _padded(plan.seq_lens, _ALIGN_BYTES // 4)
    ids, pos, out_slots, req_rows, lens64 = _pack(
        (
            plan.input_ids,
            plan.positions,
            plan.out_slots,
            plan.req_rows,
            seq_padded + plan.extend_lens,
        ),
        torch.int64,
        device,
        h2d,
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
        seq_lens_cpu=plan.seq_lens,
        extend_lens_cpu=plan.extend_lens,
        page_size=pool.page_size,
        k_caches=pool.k_caches,
        v_caches=pool.v_caches,
        attn=attn,
    )


def with_bitmask(sb: SamplingBatch, bitmask: torch.Tensor | None) -> SamplingBatch:
    """`sb` with a structured-output host bitmask ([B, ceil(vocab / 32)] int32) on its device,
    copied without waiting: a copy from pageable memory would wait for the GPU's queued work,
    so it goes through pinned memory (a copy of it, unless it is pinned already; torch's
    pinned blocks are reused only once the copy out of them is done)."""
    if bitmask is None:
        return sb
    device = sb.temperature.device
    if device.type != "cpu":
        pinned = bitmask if bitmask.is_pinned() else bitmask.pin_memory()
        bitmask = pinned.to(device, non_blocking=True)
    return replace(sb, grammar_bitmask=bitmask)


def sampling_batch(
    sp: SamplingPlan,
    vocab: int,
    device: torch.device,
    h2d: HostToDevice,
    future: torch.Tensor | None,
) -> SamplingBatch:
    """The sampling tensors of a plan; id lists are padded with `vocab`."""

    def padded(rows: list[list[int]]) -> torch.Tensor:
        width = max(1, max(len(r) for r in rows))
        flat = [t for r in rows for t in r + [vocab] * (width - len(r))]
        ids = h2d(flat, torch.int64, device).view(len(rows), width)
        return resolve_placeholders(ids, future)

    penalties = None
    if sp.penalties is not None:
        pp = sp.penalties
        repetition, presence, frequency = _pack(
            (pp.repetition, pp.presence, pp.frequency), torch.float32, device, h2d
        )
        penalties = Penalties(
            repetition=repetition,
            presence=presence,
            frequency=frequency,
            seen_ids=padded(pp.seen_ids),
            output_ids=padded(pp.output_ids),
        )
    banned = padded(sp.banned_ids) if sp.banned_ids is not None else None
    temperature, top_p, min_p = _pack(
        (sp.temperature, sp.top_p, sp.min_p), torch.float32, device, h2d
    )
    top_k, seeds, steps = _pack((sp.top_k, sp.seeds, sp.steps), torch.int64, device, h2d)
    return SamplingBatch(
        temperature=temperature,
        top_p=top_p,
        min_p=min_p,
        top_k=top_k,
        seeds=seeds,
        steps=steps,
        all_greedy=sp.all_greedy,
        use_top_k=sp.use_top_k,
        use_top_p=sp.use_top_p,
        use_min_p=sp.use_min_p,
        penalties=penalties,
        banned_ids=banned,
        want_logprobs=sp.want_logprobs,
        top_logprobs=sp.top_logprobs,
        max_top_k=sp.max_top_k or None,
    )
