"""Fused sampling on the GPU: one token per row of logits [B, V], split over the vocabulary.

Greedy rows (temperature below minisgl.sampling_params.GREEDY_TEMPERATURE, 0 included) take
the argmax of the logits; others the argmax of logits / temperature + Gumbel noise, where the
noise comes from the same counter-based hash of (seed, step, token id) as
minisgl.engine.sampler.uniform_noise. argmax(l / T + G) with G = -log(-log u) picks the same
token as the sampler's exponential race argmax(softmax(l / T) / -log u), without
materialising probabilities or noise. The logits are scaled in float32 by
1 / T <= 1 / GREEDY_TEMPERATURE, which cannot overflow for real logits.

Each row is cut into chunks of `chunk` tokens and each (row, chunk) is one program, so a batch
of any size fills the GPU: `_race_kernel` writes each chunk's best (score, token), and
`_reduce_kernel` picks the best chunk per row. Among equal scores the lowest token id wins at
both levels, as with torch.argmax.

Filters keep a subset of each row and race over it:
- min-p keeps the tokens with l >= max(l) + T log(min_p) (the same set as
  p >= min_p * max(p); the row max of the logits comes from torch.amax or top-k).
- top-k and top-p keep the first n tokens in the order (logit descending, token id ascending;
  filtered_probs sorts stably, so equal probabilities rank by id there too). torch.topk gives
  the K largest logits of each row (K = min(max_top_k, MAX_CANDIDATES)); `_cut_kernel` finds
  n (top_p's smallest prefix of the min-p-filtered mass reaching top_p, whose total
  `_mass_kernel` sums over the whole row; at most top_k) and turns it into a cut: keep l > v,
  and of the tokens with l == v the lowest ids up to `cut_idx`. When the tokens tied at v
  reach past the candidates, `_ties_kernel` counts them per chunk instead and the race keeps
  the first `quota` of them. When the cut itself lies past the candidates (a flat row under
  top-p, or top_k above K), `_search_kernel` finds v for that row by bisection over the whole
  row (one program, ~33 passes over it: slower, but still no sort and no sync).
The kept set is then the one filtered_probs keeps, up to float rounding of the min-p and
top-p thresholds (a token whose probability sits within a rounding error of the threshold).

`sample_rows_one_program` keeps the one-program-per-row kernel for comparison (benchmarks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from minisgl.kernels.jit import jit
from minisgl.sampling_params import GREEDY_TEMPERATURE

#: The most candidates top-k / top-p take per row (torch.topk's k); cuts further down the
#: row are found by `_search_kernel`.
MAX_CANDIDATES = 1024

_TILE = 1024  # tokens one program loads at a time
_MIN_CHUNK = 1024
_MAX_CHUNK = 16384
_TARGET_PROGRAMS = 1024  # several waves on a GPU of ~132 SMs


def _jit_runtime_ints(*names: str) -> Callable[[Callable[..., Any]], Any]:
    """minisgl.kernels.jit.jit, with these integer arguments compiled as runtime values (not
    specialised on being 1 or a multiple of 16): every batch size runs the same binary."""

    def wrap(fn: Callable[..., Any]) -> Any:
        return triton.jit(fn, do_not_specialize=names)

    return wrap


@jit
def _fmix32(h):  # type: ignore[no-untyped-def]
    h = h ^ (h >> 16)
    h = h * tl.full(h.shape, 0x85EBCA6B, tl.uint32)
    h = h ^ (h >> 13)
    h = h * tl.full(h.shape, 0xC2B2AE35, tl.uint32)
    return h ^ (h >> 16)


@jit
def _row_hash(SEEDS, STEPS, row, PREHASHED: tl.constexpr):  # type: ignore[no-untyped-def]
    """minisgl.engine.sampler.row_hash of one row (or the precomputed hash in SEEDS)."""
    if PREHASHED:
        rh = tl.load(SEEDS + row).to(tl.uint32)
    else:
        seed = tl.load(SEEDS + row).to(tl.int64)
        step = tl.load(STEPS + row).to(tl.int64)
        lo = (seed & 0xFFFFFFFF).to(tl.uint32)
        hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        st = (step & 0xFFFFFFFF).to(tl.uint32)
        golden = tl.full(lo.shape, 0x9E3779B9, tl.uint32)
        rh = _fmix32(_fmix32(_fmix32(lo ^ golden) ^ hi) ^ st)
    return rh


@jit
def _inv_temperature(TEMP, row, greedy_below):  # type: ignore[no-untyped-def]
    temp = tl.load(TEMP + row).to(tl.float32)
    greedy = temp < greedy_below
    return greedy, 1.0 / tl.where(greedy, 1.0, temp)


@jit
def _min_p_floor(MIN_P, TEMP, row, max_logit, greedy_below):  # type: ignore[no-untyped-def]
    """The smallest logit min-p keeps in one row: max + T log(min_p), the logit form of
    p >= min_p * max(p). -inf for min_p 0; the max itself for min_p 1 (always kept, as
    T log(min_p) <= 0 exactly)."""
    min_p = tl.load(MIN_P + row).to(tl.float32)
    temp = tl.load(TEMP + row).to(tl.float32)
    temp = tl.where(temp < greedy_below, 1.0, temp)
    log_min_p = tl.where(min_p > 0.0, tl.log(tl.maximum(min_p, 1e-30)), float("-inf"))
    return max_logit + log_min_p * temp


@_jit_runtime_ints("row_max_stride", "n_chunks", "chunk")
def _race_kernel(  # type: ignore[no-untyped-def]
    LOGITS,
    stride,
    SEEDS,
    STEPS,
    TEMP,
    ROW_MAX,
    row_max_stride,
    MIN_P,
    CUT_VAL,
    CUT_IDX,
    CUT_QUOTA,
    TIES,
    PART_VAL,
    PART_IDX,
    vocab,
    n_chunks,
    chunk,
    greedy_below,
    TILE: tl.constexpr,
    CHUNKS_P2: tl.constexpr,
    PREHASHED: tl.constexpr,
    HAS_MIN_P: tl.constexpr,
    HAS_CUT: tl.constexpr,
):
    row = tl.program_id(0)
    part = tl.program_id(1)
    greedy, inv_t = _inv_temperature(TEMP, row, greedy_below)
    rh = _row_hash(SEEDS, STEPS, row, PREHASHED)
    base = LOGITS + row.to(tl.int64) * stride
    start = part * chunk
    offs = tl.arange(0, TILE)
    mult = tl.full(offs.shape, 0x27D4EB2F, tl.uint32)
    best_val = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.full([], 0, tl.int32) + start
    if HAS_MIN_P:
        max_logit = tl.load(ROW_MAX + row.to(tl.int64) * row_max_stride).to(tl.float32)
        floor = _min_p_floor(MIN_P, TEMP, row, max_logit, greedy_below)
    if HAS_CUT:
        cut_val = tl.load(CUT_VAL + row)
        cut_idx = tl.load(CUT_IDX + row)
        quota = tl.load(CUT_QUOTA + row)
        # ties before this chunk (only read when the cut is by quota)
        c = tl.arange(0, CHUNKS_P2)
        upto = tl.where(cut_idx < 0, part, 0)
        ties_row = tl.load(TIES + row * n_chunks + c, mask=c < upto, other=0)
        ties_seen = tl.sum(ties_row, axis=0)
    for t in range(0, chunk, TILE):
        cols = start + t + offs
        mask = cols < vocab
        logit = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if greedy:
            val = logit
        else:
            h = _fmix32(_fmix32(rh + cols.to(tl.uint32) * mult) ^ rh)
            u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
            gumbel = -tl.log(-tl.log(u))
            val = logit * inv_t + gumbel
            keep = mask
            if HAS_MIN_P:
                keep = keep & (logit >= floor)
            if HAS_CUT:
                tie = (logit == cut_val) & mask
                if cut_idx >= 0:
                    kept_tie = tie & (cols <= cut_idx)
                else:
                    rank = ties_seen + tl.cumsum(tie.to(tl.int32), axis=0) - 1
                    ties_seen += tl.sum(tie.to(tl.int32), axis=0)
                    kept_tie = tie & (rank < quota)
                keep = keep & ((logit > cut_val) | kept_tie)
            val = tl.where(keep, val, float("-inf"))
        val = tl.where(mask, val, float("-inf"))
        tile_max = tl.max(val, axis=0)
        tile_idx = tl.argmax(val, axis=0).to(tl.int32) + start + t
        better = tile_max > best_val
        best_idx = tl.where(better, tile_idx, best_idx)
        best_val = tl.where(better, tile_max, best_val)
    tl.store(PART_VAL + row * n_chunks + part, best_val)
    tl.store(PART_IDX + row * n_chunks + part, best_idx)


@_jit_runtime_ints("n_chunks")
def _reduce_kernel(  # type: ignore[no-untyped-def]
    PART_VAL, PART_IDX, OUT, n_chunks, CHUNKS_P2: tl.constexpr
):
    row = tl.program_id(0)
    c = tl.arange(0, CHUNKS_P2)
    mask = c < n_chunks
    val = tl.load(PART_VAL + row * n_chunks + c, mask=mask, other=float("-inf"))
    idx = tl.load(PART_IDX + row * n_chunks + c, mask=mask, other=2147483647)
    best = tl.max(val, axis=0)
    # The lowest token among the chunks reaching the best score (chunk 0 when all are -inf).
    tok = tl.min(tl.where(mask & (val == best), idx, 2147483647), axis=0)
    tl.store(OUT + row, tok.to(tl.int64))


@_jit_runtime_ints("row_max_stride", "n_chunks", "chunk")
def _mass_kernel(  # type: ignore[no-untyped-def]
    LOGITS,
    stride,
    TEMP,
    ROW_MAX,
    row_max_stride,
    MIN_P,
    PART_SUM,
    vocab,
    n_chunks,
    chunk,
    greedy_below,
    TILE: tl.constexpr,
    HAS_MIN_P: tl.constexpr,
):
    """Per chunk: sum of exp(s - max(s)) over the tokens min-p keeps (top-p's total mass)."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    _, inv_t = _inv_temperature(TEMP, row, greedy_below)
    max_logit = tl.load(ROW_MAX + row.to(tl.int64) * row_max_stride).to(tl.float32)
    m = max_logit * inv_t
    if HAS_MIN_P:
        floor = _min_p_floor(MIN_P, TEMP, row, max_logit, greedy_below)
    base = LOGITS + row.to(tl.int64) * stride
    start = part * chunk
    offs = tl.arange(0, TILE)
    acc = tl.zeros([TILE], tl.float32)
    for t in range(0, chunk, TILE):
        cols = start + t + offs
        mask = cols < vocab
        logit = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        d = logit * inv_t - m
        keep = mask & (logit > float("-inf"))
        if HAS_MIN_P:
            keep = keep & (logit >= floor)
        acc += tl.where(keep, tl.exp(tl.where(keep, d, 0.0)), 0.0)
    tl.store(PART_SUM + row * n_chunks + part, tl.sum(acc, axis=0))


@_jit_runtime_ints("n_cand", "n_chunks")
def _cut_kernel(  # type: ignore[no-untyped-def]
    CAND_VAL,
    CAND_IDX,
    n_cand,
    TEMP,
    TOP_K,
    TOP_P,
    MIN_P,
    PART_SUM,
    CUT_VAL,
    CUT_IDX,
    CUT_QUOTA,
    vocab,
    n_chunks,
    greedy_below,
    CAND_P2: tl.constexpr,
    CHUNKS_P2: tl.constexpr,
    HAS_MIN_P: tl.constexpr,
    HAS_TOP_P: tl.constexpr,
):
    """Per row: how many tokens top-k / top-p keep, as a cut (value, last tied id or quota);
    cut_idx -2 where the cut lies past the candidates (found by _search_kernel)."""
    row = tl.program_id(0)
    r = tl.arange(0, CAND_P2)
    in_cand = r < n_cand
    vals = tl.load(CAND_VAL + row * n_cand + r, mask=in_cand, other=float("-inf"))
    vals = vals.to(tl.float32)
    ids = tl.load(CAND_IDX + row * n_cand + r, mask=in_cand, other=0).to(tl.int32)
    greedy, inv_t = _inv_temperature(TEMP, row, greedy_below)
    k_row = tl.load(TOP_K + row)
    k = tl.minimum(k_row, n_cand).to(tl.int32)
    top_p = tl.load(TOP_P + row).to(tl.float32)
    n = k
    # Past the candidates: top-k beyond them, unless top-p stops within them.
    beyond = k_row > n_cand
    if HAS_TOP_P:
        s = vals * inv_t
        m = tl.max(s, axis=0)
        keep = in_cand & (vals > float("-inf"))
        if HAS_MIN_P:
            keep = keep & (vals >= _min_p_floor(MIN_P, TEMP, row, tl.max(vals, 0), greedy_below))
        e = tl.where(keep, tl.exp(tl.where(keep, s - m, 0.0)), 0.0)
        c = tl.arange(0, CHUNKS_P2)
        total = tl.sum(tl.load(PART_SUM + row * n_chunks + c, mask=c < n_chunks, other=0.0), 0)
        before = tl.cumsum(e, axis=0) - e
        reach = tl.sum((in_cand & (before < top_p * total)).to(tl.int32), axis=0)
        n = tl.where(top_p < 1.0, tl.minimum(n, tl.maximum(reach, 1)), n)
        stops = (top_p < 1.0) & (tl.sum(e, axis=0) >= top_p * total)
        beyond = beyond & ~stops
    v = tl.sum(tl.where(r == n - 1, vals, 0.0), axis=0)  # the n-th largest logit
    above = tl.sum((in_cand & (vals > v)).to(tl.int32), axis=0)
    quota = n - above
    tied = in_cand & (vals == v)
    # The tie at v lies within the candidates when a smaller value follows it (or all are in).
    last = tl.sum(tl.where(r == n_cand - 1, vals, 0.0), axis=0)
    contained = (n_cand >= vocab) | (last < v)
    # The quota-th lowest id among the tied candidates (a sort only when several stay).
    tied_ids = tl.where(tied, ids, 2147483647)
    cut_idx = tl.min(tied_ids, axis=0)
    if contained & (quota > 1):
        cut_idx = tl.sum(tl.where(r == quota - 1, tl.sort(tied_ids, dim=0), 0), axis=0)
    cut_idx = tl.where(contained, cut_idx, -1)
    cut_idx = tl.where(beyond & (n_cand < vocab), -2, cut_idx)  # for _search_kernel
    off = greedy | ((k_row >= vocab) & (top_p >= 1.0))
    tl.store(CUT_VAL + row, tl.where(off, float("-inf"), v))
    tl.store(CUT_IDX + row, tl.where(off, vocab, cut_idx))
    tl.store(CUT_QUOTA + row, quota)


@jit
def _key(x):  # type: ignore[no-untyped-def]
    """float32 -> int32 with the same order (-inf lowest)."""
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@jit
def _unkey(k):  # type: ignore[no-untyped-def]
    return tl.where(k >= 0, k, k ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@jit
def _above(base, vocab, w, inv_t, m, floor, TILE: tl.constexpr, HAS_MIN_P: tl.constexpr):  # type: ignore[no-untyped-def]
    """Tokens with logit > w, with logit == w, and the exp(s - max s) mass of those above
    (min-p's kept tokens only)."""
    offs = tl.arange(0, TILE)
    count = tl.zeros([TILE], tl.int32)
    equal = tl.zeros([TILE], tl.int32)
    mass = tl.zeros([TILE], tl.float32)
    for start in range(0, vocab, TILE):
        cols = start + offs
        mask = cols < vocab
        logit = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        over = mask & (logit > w)
        count += over.to(tl.int32)
        equal += (mask & (logit == w)).to(tl.int32)
        keep = over
        if HAS_MIN_P:
            keep = keep & (logit >= floor)
        mass += tl.where(keep, tl.exp(tl.where(keep, logit * inv_t - m, 0.0)), 0.0)
    return tl.sum(count, axis=0), tl.sum(equal, axis=0), tl.sum(mass, axis=0)


@_jit_runtime_ints("n_cand", "n_chunks")
def _search_kernel(  # type: ignore[no-untyped-def]
    LOGITS,
    stride,
    CAND_VAL,
    n_cand,
    TEMP,
    TOP_K,
    TOP_P,
    MIN_P,
    PART_SUM,
    CUT_VAL,
    CUT_IDX,
    CUT_QUOTA,
    vocab,
    n_chunks,
    greedy_below,
    TILE: tl.constexpr,
    CHUNKS_P2: tl.constexpr,
    HAS_MIN_P: tl.constexpr,
    HAS_TOP_P: tl.constexpr,
):
    """For rows whose cut lies past the candidates: the n-th largest logit v by bisection
    over the float order (the smallest w with fewer than top_k tokens above it and, with
    top-p, their mass below top_p of the total), then how many tokens tied at v stay."""
    row = tl.program_id(0)
    if tl.load(CUT_IDX + row) == -2:
        base = LOGITS + row.to(tl.int64) * stride
        _, inv_t = _inv_temperature(TEMP, row, greedy_below)
        max_logit = tl.load(CAND_VAL + row * n_cand).to(tl.float32)
        m = max_logit * inv_t
        floor = max_logit
        if HAS_MIN_P:
            floor = _min_p_floor(MIN_P, TEMP, row, max_logit, greedy_below)
        k = tl.load(TOP_K + row).to(tl.int32)
        top_p = tl.load(TOP_P + row).to(tl.float32)
        target = float("inf")
        if HAS_TOP_P:
            c = tl.arange(0, CHUNKS_P2)
            total = tl.sum(tl.load(PART_SUM + row * n_chunks + c, mask=c < n_chunks, other=0.0))
            target = tl.where(top_p < 1.0, top_p * total, float("inf"))
        # Invariant: w = unkey(hi) leaves few enough tokens above it, unkey(lo) does not.
        hi = _key(tl.load(CAND_VAL + row * n_cand + n_cand - 1).to(tl.float32)).to(tl.int64)
        lo = _key(tl.full([], float("-inf"), tl.float32)).to(tl.int64) - 1
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            w = _unkey(mid.to(tl.int32))
            count, _eq, mass = _above(base, vocab, w, inv_t, m, floor, TILE, HAS_MIN_P)
            ok = (count < k) & (mass < target)
            hi = tl.where(ok, mid, hi)
            lo = tl.where(ok, lo, mid)
        v = _unkey(hi.to(tl.int32))
        above, tied, mass = _above(base, vocab, v, inv_t, m, floor, TILE, HAS_MIN_P)
        quota = tl.minimum(k - above, tied)
        if HAS_TOP_P:
            # Tied tokens each add e_v; those starting below the target stay (at least one).
            e_v = tl.exp(v * inv_t - m)
            by_p = tl.ceil((target - mass) / tl.where(e_v > 0.0, e_v, 1.0))
            by_p = tl.where(e_v > 0.0, tl.minimum(by_p, tied.to(tl.float32)), tied.to(tl.float32))
            quota = tl.where(target < float("inf"), tl.minimum(quota, by_p.to(tl.int32)), quota)
        tl.store(CUT_VAL + row, v)
        tl.store(CUT_IDX + row, -1)
        tl.store(CUT_QUOTA + row, tl.maximum(quota, 1))


@_jit_runtime_ints("n_chunks", "chunk")
def _ties_kernel(  # type: ignore[no-untyped-def]
    LOGITS,
    stride,
    CUT_VAL,
    CUT_IDX,
    TIES,
    vocab,
    n_chunks,
    chunk,
    TILE: tl.constexpr,
):
    """Per chunk: tokens equal to the cut value, for rows whose tie reaches past the
    candidates (others write 0 without reading the logits)."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    cut_val = tl.load(CUT_VAL + row)
    count = tl.zeros([TILE], tl.int32)
    if tl.load(CUT_IDX + row) < 0:
        base = LOGITS + row.to(tl.int64) * stride
        start = part * chunk
        offs = tl.arange(0, TILE)
        for t in range(0, chunk, TILE):
            cols = start + t + offs
            mask = cols < vocab
            logit = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            count += (mask & (logit == cut_val)).to(tl.int32)
    tl.store(TIES + row * n_chunks + part, tl.sum(count, axis=0))


def chunk_size(bsz: int, vocab: int) -> int:
    """Tokens per program: a power of two in [1024, 16384] giving ~_TARGET_PROGRAMS programs."""
    want = -(-bsz * vocab // _TARGET_PROGRAMS)
    chunk = min(_MAX_CHUNK, max(_MIN_CHUNK, _next_power_of_2(want)))
    return min(chunk, max(16, _next_power_of_2(vocab)))


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class _Split:
    """Chunking of one [B, V] call and the per-chunk scratch tensors."""

    def __init__(self, logits: torch.Tensor, chunk: int | None) -> None:
        self.bsz, self.vocab = logits.shape
        self.chunk = chunk or chunk_size(self.bsz, self.vocab)
        if self.chunk < 16 or self.chunk & (self.chunk - 1):
            raise ValueError(f"chunk: must be a power of two >= 16 (got {self.chunk})")
        self.tile = min(_TILE, self.chunk)
        self.n_chunks = triton.cdiv(self.vocab, self.chunk)
        # One compiled variant for every batch size: chunks of a 256k vocabulary fit in 256.
        self.chunks_p2 = max(256, _next_power_of_2(self.n_chunks))
        dev = logits.device
        self.part_val = torch.empty(self.bsz, self.n_chunks, dtype=torch.float32, device=dev)
        self.part_idx = torch.empty(self.bsz, self.n_chunks, dtype=torch.int32, device=dev)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor | None = None,
    *,
    min_p: torch.Tensor | None = None,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    max_top_k: int | None = None,
    candidates: int = MAX_CANDIDATES,
    chunk: int | None = None,
) -> torch.Tensor:
    """Token per row of logits [B, V] (float32 / float16 / bfloat16, unit stride in V).

    temperature [B] (below GREEDY_TEMPERATURE = greedy); seeds and steps [B] int64, or
    steps None and seeds the rows' minisgl.engine.sampler.row_hash. min_p [B] float32 turns
    min-p on; top_k [B] int64 (vocab = off) and top_p [B] float32 (1.0 = off) turn top-k /
    top-p on. max_top_k, when known, bounds top_k of every row with top-k or top-p on (vocab
    for a top-p row without top-k): it lets fewer candidates than `candidates` do, and rows
    whose cut lies past the candidates are searched over the whole row instead (slower).
    `candidates` and `chunk` (tokens per program, a power of two) are for tests."""
    bsz, vocab = logits.shape
    out = torch.empty(bsz, dtype=torch.int64, device=logits.device)
    if bsz == 0:
        return out
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    sp = _Split(logits, chunk)
    prehashed = steps is None
    steps_arg = seeds if steps is None else steps
    has_cut = top_k is not None or top_p is not None
    has_min_p = min_p is not None
    row_max: torch.Tensor | None = None
    row_max_stride = 0
    cut_val = cut_idx = cut_quota = ties = None
    if has_cut:
        if max_top_k is not None and max_top_k < 1:
            raise ValueError(f"max_top_k: must be >= 1 (got {max_top_k!r})")
        n_cand = min(max_top_k or candidates, candidates, vocab)
        cand_val, cand_idx = logits.topk(n_cand, dim=-1)
        row_max, row_max_stride = cand_val, cand_val.stride(0)
        k_arg = top_k if top_k is not None else torch.full_like(seeds, vocab)
        p_arg = top_p if top_p is not None else torch.ones_like(temperature)
        part_sum = sp.part_val  # unused unless top_p
        if top_p is not None:
            part_sum = torch.empty(bsz, sp.n_chunks, dtype=torch.float32, device=logits.device)
            _mass_kernel[(bsz, sp.n_chunks)](
                logits, logits.stride(0), temperature, row_max, row_max_stride,
                min_p if min_p is not None else temperature, part_sum, vocab, sp.n_chunks,
                sp.chunk, GREEDY_TEMPERATURE, TILE=sp.tile, HAS_MIN_P=has_min_p,
            )  # fmt: skip
        cut_val = torch.empty(bsz, dtype=torch.float32, device=logits.device)
        cut_idx = torch.empty(bsz, dtype=torch.int32, device=logits.device)
        cut_quota = torch.empty(bsz, dtype=torch.int32, device=logits.device)
        _cut_kernel[(bsz,)](
            cand_val, cand_idx, n_cand, temperature, k_arg, p_arg,
            min_p if min_p is not None else temperature, part_sum, cut_val, cut_idx, cut_quota,
            vocab, sp.n_chunks, GREEDY_TEMPERATURE, CAND_P2=max(64, _next_power_of_2(n_cand)),
            CHUNKS_P2=sp.chunks_p2, HAS_MIN_P=has_min_p, HAS_TOP_P=top_p is not None,
        )  # fmt: skip
        if n_cand < vocab and (max_top_k is None or max_top_k > n_cand):
            _search_kernel[(bsz,)](
                logits, logits.stride(0), cand_val, n_cand, temperature, k_arg, p_arg,
                min_p if min_p is not None else temperature, part_sum, cut_val, cut_idx,
                cut_quota, vocab, sp.n_chunks, GREEDY_TEMPERATURE,
                TILE=min(_TILE, _next_power_of_2(vocab)),
                CHUNKS_P2=sp.chunks_p2, HAS_MIN_P=has_min_p, HAS_TOP_P=top_p is not None,
                num_warps=8,
            )  # fmt: skip
        ties = torch.empty(bsz, sp.n_chunks, dtype=torch.int32, device=logits.device)
        _ties_kernel[(bsz, sp.n_chunks)](
            logits, logits.stride(0), cut_val, cut_idx, ties, vocab, sp.n_chunks, sp.chunk,
            TILE=sp.tile,
        )  # fmt: skip
    elif has_min_p:
        row_max = logits.amax(dim=-1)
        row_max_stride = 1
    _race_kernel[(bsz, sp.n_chunks)](
        logits, logits.stride(0), seeds, steps_arg, temperature,
        row_max if row_max is not None else temperature, row_max_stride,
        min_p if min_p is not None else temperature,
        cut_val if cut_val is not None else temperature,
        cut_idx if cut_idx is not None else sp.part_idx,
        cut_quota if cut_quota is not None else sp.part_idx,
        ties if ties is not None else sp.part_idx,
        sp.part_val, sp.part_idx, vocab, sp.n_chunks, sp.chunk, GREEDY_TEMPERATURE,
        TILE=sp.tile, CHUNKS_P2=sp.chunks_p2, PREHASHED=prehashed,
        HAS_MIN_P=has_min_p, HAS_CUT=has_cut,
    )  # fmt: skip
    _reduce_kernel[(bsz,)](sp.part_val, sp.part_idx, out, sp.n_chunks, CHUNKS_P2=sp.chunks_p2)
    return out


def sample_rows(
    logits: torch.Tensor, temperature: torch.Tensor, row_hash: torch.Tensor
) -> torch.Tensor:
    """Token per row of logits [B, V]; temperature [B] (below GREEDY_TEMPERATURE = greedy),
    row_hash [B] int64 (minisgl.engine.sampler.row_hash)."""
    return sample(logits, temperature, row_hash)


@jit
def _sample_kernel(  # type: ignore[no-untyped-def]
    LOGITS, stride, ROW_HASH, TEMP, OUT, vocab, greedy_below, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    rh = tl.load(ROW_HASH + row).to(tl.uint32)
    temp = tl.load(TEMP + row).to(tl.float32)
    greedy = temp < greedy_below
    inv_t = 1.0 / tl.where(greedy, 1.0, temp)
    best_val = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.full([], 0, tl.int64)
    offs = tl.arange(0, BLOCK)
    for start in range(0, vocab, BLOCK):
        cols = start + offs
        mask = cols < vocab
        logit = tl.load(LOGITS + row.to(tl.int64) * stride + cols, mask=mask, other=float("-inf"))
        logit = logit.to(tl.float32)
        mult = tl.full(offs.shape, 0x27D4EB2F, tl.uint32)
        h = _fmix32(_fmix32(rh + cols.to(tl.uint32) * mult) ^ rh)
        u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        gumbel = -tl.log(-tl.log(u))
        val = tl.where(greedy, logit, logit * inv_t + gumbel)
        val = tl.where(mask, val, float("-inf"))
        block_max = tl.max(val, axis=0)
        block_idx = tl.argmax(val, axis=0).to(tl.int64) + start
        better = block_max > best_val
        best_idx = tl.where(better, block_idx, best_idx)
        best_val = tl.where(better, block_max, best_val)
    tl.store(OUT + row, best_idx)


def sample_rows_one_program(
    logits: torch.Tensor, temperature: torch.Tensor, row_hash: torch.Tensor
) -> torch.Tensor:
    """sample_rows with one program per row over the whole vocabulary (for comparison)."""
    bsz, vocab = logits.shape
    out = torch.empty(bsz, dtype=torch.int64, device=logits.device)
    if bsz:
        _sample_kernel[(bsz,)](
            logits, logits.stride(0), row_hash, temperature, out, vocab, GREEDY_TEMPERATURE,
            BLOCK=min(2048, max(16, triton.next_power_of_2(vocab))),
        )  # fmt: skip
    return out
