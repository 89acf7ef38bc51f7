"""Triton paged attention: split-KV decode (flash-decoding) and varlen extend/prefill.

Both kernels read K/V through the page table: key position t of a request lives in slot
`page_table[row, t // PAGE_SIZE] * PAGE_SIZE + t % PAGE_SIZE` of the [num_slots, Hkv, D] caches.
Softmax runs in base 2 (the scale is pre-multiplied by log2(e)) and accumulates in float32.

FP8 caches (float8_e4m3fn, `--kv-cache-dtype fp8_e4m3`): each K/V tile is converted right
after its load, so the dots run as for a 16-bit cache: to float16 in the decode kernel (with
the query converted once; e4m3 -> float16 is one instruction per pair on sm_90, -> bfloat16
several, which made the decode kernel slower than with a bf16 cache), to the query's dtype in
the extend kernel. The per-layer
scales never touch a tile: k_scale is folded into the softmax scale on the host (q . (k_scale
k) = k_scale (q . k)) and v_scale multiplies the output once (sum p (v_scale v) = v_scale sum
p v), also each split's partial output, which the merge combines linearly. A cache in the
query's dtype runs the same code with both scales 1.0. Triton converts float8_e4m3fn on
sm_89 and newer (Ada, Hopper) only.

Decode: grid (batch, kv_head, num_splits). One program takes all G = Hq // Hkv query heads of
its kv head as the M side of a tensor-core dot (padded to BLOCK_H >= 16 rows), walks its slice of
the request's keys in BLOCK_N tiles and writes a partial output and log-sum-exp; a small merge
kernel, grid (batch, q_head), combines the splits. With one split the first kernel writes the
final output and the merge is skipped.

Extend: grid (query_block, q_head) over a host-built list of (request, token start, offset)
blocks of BLOCK_M new tokens, so ragged batches launch no empty programs; the blocks reading the
most keys come first. Keys below the block's first query position are visible to every row and
run without masks; the tail up to the block's last position runs with the causal mask. New
tokens are already stored in the cache, so the cached prefix and the causal part are one loop
over the paged keys. GQA: each program is one query head and reads kv head h // G.

Split choice (choose_num_splits, called from the backend's prepare): none while
batch x kv_heads already covers two waves of SMs; otherwise enough splits for two waves, at most
64, and at least 128 keys per split.

Store (store_kv_fp8, CUDA only): new K and V rows into an FP8 cache in one launch, grid
(token,): divide by the layer's scale (IEEE division, as torch does), saturate to +-448, round
to nearest even. The interpreter's float-to-FP8 conversion rounds values just below a power of
two down a binade, so on CPU the torch path stores instead (tests/gpu/test_fp8_kv_gpu.py
checks this kernel's bytes against torch's on the GPU).

Importing this module imports triton; the torch backend never imports it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from minisgl.kernels.jit import jit

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 64
_MIN_SPLIT_TOKENS = 128  # a split walks at least this many keys
_SMEM_SLACK = 16 * 1024  # shared memory left for the rest of the decode kernel


@jit
def _attend_tile(  # type: ignore[no-untyped-def]
    acc,
    m_i,
    l_i,
    q,
    k_head,
    v_head,
    pt_row,
    n_start,
    n_limit,
    qpos,
    qk_scale,
    stride_ks,
    stride_vs,
    offs_d,
    mask_d,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    EVEN_D: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One BLOCK_N tile of keys starting at n_start: online-softmax update of (acc, m_i, l_i)."""
    offs_n = n_start + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_limit
    if MASK_N:
        page = tl.load(pt_row + offs_n // PAGE_SIZE, mask=mask_n, other=0)
    else:
        page = tl.load(pt_row + offs_n // PAGE_SIZE)
    slot = page.to(tl.int64) * PAGE_SIZE + offs_n % PAGE_SIZE
    k_ptrs = k_head + slot[:, None] * stride_ks + offs_d[None, :]
    v_ptrs = v_head + slot[:, None] * stride_vs + offs_d[None, :]
    if MASK_N:
        kv_mask = mask_n[:, None] if EVEN_D else mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    else:
        if EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=mask_d[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
    # An FP8 cache's values become the query's dtype (a no-op for a cache in that dtype).
    k = k.to(q.dtype)
    v = v.to(q.dtype)
    # float32 inputs get exact products rather than TF32; 16-bit inputs ignore the flag.
    qk = tl.dot(q, tl.trans(k), input_precision="ieee") if IEEE else tl.dot(q, tl.trans(k))
    qk = qk * qk_scale
    if MASK_N:
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
    if CAUSAL:
        qk = tl.where(offs_n[None, :] <= qpos[:, None], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v.dtype)
    pv = tl.dot(p, v, input_precision="ieee") if IEEE else tl.dot(p, v)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@jit
def _decode_kernel(  # type: ignore[no-untyped-def]
    Q,
    K,
    V,
    Out,
    MidO,
    MidLse,
    ReqRows,
    PageTable,
    SeqLens,
    qk_scale,
    v_scale,
    num_splits,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_pt,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE: tl.constexpr,
    IEEE: tl.constexpr,
    F16_DOT: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + b)
    row = tl.load(ReqRows + b).to(tl.int64)
    # Splits are whole BLOCK_N tiles so only the last tile of the sequence needs a mask.
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < G
    mask_d = offs_d < HEAD_DIM
    heads = kvh * G + offs_h
    q_mask = mask_h[:, None] & mask_d[None, :]
    q = tl.load(
        Q + b * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=q_mask, other=0.0
    )
    if F16_DOT:  # FP8 tiles convert to float16 in one instruction per pair (bf16 takes more)
        q = q.to(tl.float16)

    pt_row = PageTable + row * stride_pt
    k_head = K + kvh.to(tl.int64) * stride_kh
    v_head = V + kvh.to(tl.int64) * stride_vh
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    for n in range(start, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, k_head, v_head, pt_row, n, end, offs_h, qk_scale,
            stride_ks, stride_vs, offs_d, mask_d,
            PAGE_SIZE, BLOCK_N, False, False, HEAD_DIM == BLOCK_D, IEEE,
        )  # fmt: skip
    if full_end < end:
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, k_head, v_head, pt_row, full_end, end, offs_h, qk_scale,
            stride_ks, stride_vs, offs_d, mask_d,
            PAGE_SIZE, BLOCK_N, True, False, HEAD_DIM == BLOCK_D, IEEE,
        )  # fmt: skip

    nonempty = l_i > 0.0
    out = acc * (v_scale / tl.where(nonempty, l_i, 1.0))[:, None]
    if SINGLE:
        o_ptrs = Out + b * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_mask)
    else:
        mid = MidO + b * stride_mb + heads[:, None] * stride_mh + split * stride_ms
        tl.store(mid + offs_d[None, :], out, mask=q_mask)
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(MidLse + b * stride_lb + heads * stride_lh + split, lse, mask=mask_h)


@jit
def _merge_kernel(  # type: ignore[no-untyped-def]
    MidO,
    MidLse,
    Out,
    num_splits,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mid = MidO + b * stride_mb + h * stride_mh
    lse_ptr = MidLse + b * stride_lb + h * stride_lh
    m = tl.full([1], -1.0e30, dtype=tl.float32)
    total = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):
        lse = tl.load(lse_ptr + s + tl.zeros([1], dtype=tl.int32))  # -inf for an empty split
        part = tl.load(mid + s * stride_ms + offs_d, mask=mask_d, other=0.0)
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha + part * w
        total = total * alpha + w
        m = m_new
    out = acc / total
    tl.store(
        Out + b * stride_ot + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=mask_d
    )


@jit
def _extend_kernel(  # type: ignore[no-untyped-def]
    Q,
    K,
    V,
    Out,
    Blocks,
    ReqRows,
    PageTable,
    SeqLens,
    ExtendLens,
    qk_scale,
    v_scale,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_pt,
    G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
):
    blk = tl.program_id(0)
    h = tl.program_id(1)
    req = tl.load(Blocks + blk * 3)
    tok_start = tl.load(Blocks + blk * 3 + 1)  # first new token of the request in q / out
    m_start = tl.load(Blocks + blk * 3 + 2)  # this block's offset among the request's new tokens
    seq_len = tl.load(SeqLens + req)
    ext_len = tl.load(ExtendLens + req)
    row = tl.load(ReqRows + req).to(tl.int64)
    prefix = seq_len - ext_len
    kvh = h // G

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < ext_len
    mask_d = offs_d < HEAD_DIM
    qpos = prefix + offs_m
    tok = (tok_start + offs_m).to(tl.int64)
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(
        Q + tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=q_mask, other=0.0
    )

    pt_row = PageTable + row * stride_pt
    k_head = K + kvh.to(tl.int64) * stride_kh
    v_head = V + kvh.to(tl.int64) * stride_vh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Keys before the block's first query position are visible to every row: no masks.
    full_end = (prefix + m_start) // BLOCK_N * BLOCK_N
    for n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, k_head, v_head, pt_row, n, seq_len, qpos, qk_scale,
            stride_ks, stride_vs, offs_d, mask_d,
            PAGE_SIZE, BLOCK_N, False, False, HEAD_DIM == BLOCK_D, IEEE,
        )  # fmt: skip
    causal_end = tl.minimum(seq_len, prefix + m_start + BLOCK_M)
    for n in range(full_end, causal_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, k_head, v_head, pt_row, n, seq_len, qpos, qk_scale,
            stride_ks, stride_vs, offs_d, mask_d,
            PAGE_SIZE, BLOCK_N, True, True, HEAD_DIM == BLOCK_D, IEEE,
        )  # fmt: skip

    out = acc * (v_scale / tl.where(l_i > 0.0, l_i, 1.0))[:, None]
    o_ptrs = Out + tok[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_mask)


@jit
def _store_fp8_kernel(  # type: ignore[no-untyped-def]
    K,
    V,
    KCache,
    VCache,
    Slots,
    k_scale,
    v_scale,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ks,
    stride_kch,
    stride_vs,
    stride_vch,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slots + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < HEADS) & (offs_d[None, :] < HEAD_DIM)
    src = offs_h[:, None] * stride_kh + offs_d[None, :]
    k = tl.load(K + t * stride_kt + src, mask=mask, other=0.0).to(tl.float32)
    k = tl.math.div_rn(k, k_scale)
    k = tl.clamp(k, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
    dst = KCache + slot * stride_ks + offs_h[:, None] * stride_kch + offs_d[None, :]
    tl.store(dst, k.to(KCache.dtype.element_ty), mask=mask)
    src = offs_h[:, None] * stride_vh + offs_d[None, :]
    v = tl.load(V + t * stride_vt + src, mask=mask, other=0.0).to(tl.float32)
    v = tl.math.div_rn(v, v_scale)
    v = tl.clamp(v, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
    dst = VCache + slot * stride_vs + offs_h[:, None] * stride_vch + offs_d[None, :]
    tl.store(dst, v.to(VCache.dtype.element_ty), mask=mask)


def store_kv_fp8(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out_slots: torch.Tensor,
    k_scale: float,
    v_scale: float,
) -> None:
    """k_cache[out_slots] = fp8(k / k_scale), v alike, saturating at +-448; one launch.

    k/v: [T, Hkv, D] (any row and head strides, contiguous last dim); caches float8_e4m3fn."""
    assert k_cache.dtype == v_cache.dtype == torch.float8_e4m3fn
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.stride(-1) == 1
    assert k.shape == v.shape and k.shape[1:] == k_cache.shape[1:]
    tokens, heads, head_dim = k.shape
    if tokens == 0:
        return
    _store_fp8_kernel[(tokens,)](
        k, v, k_cache, v_cache, out_slots, k_scale, v_scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        HEADS=heads, HEAD_DIM=head_dim, BLOCK_H=int(triton.next_power_of_2(heads)),
        BLOCK_D=int(triton.next_power_of_2(head_dim)), num_warps=4,
    )  # fmt: skip


@dataclass(frozen=True)
class ExtendConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two of at least 16 (the smallest tensor-core K)."""
    return max(16, int(triton.next_power_of_2(head_dim)))


def extend_config(head_dim: int, dtype: torch.dtype) -> ExtendConfig:
    """Tile sizes for the extend kernel; shared memory stays under ~100 KB on Hopper/Ampere."""
    bd = block_d(head_dim)
    if bd <= 64:
        cfg = ExtendConfig(128, 64, 4, 3)
    elif bd <= 128:
        cfg = ExtendConfig(128, 64, 8, 2)
    else:
        cfg = ExtendConfig(64, 32, 4, 2)
    if dtype == torch.float32:  # twice the bytes per element
        cfg = ExtendConfig(max(16, cfg.block_m // 2), max(16, cfg.block_n // 2), 4, 2)
    return cfg


@dataclass(frozen=True)
class DecodeConfig:
    """The decode kernel's tiles: BLOCK_N keys per step, warps and pipeline stages; f16_dot
    (FP8 caches only) runs the dots in float16 instead of the query's dtype."""

    block_n: int
    num_warps: int
    num_stages: int
    f16_dot: bool = False


def decode_config(
    head_dim: int, dtype: torch.dtype, kv_dtype: torch.dtype, smem_bytes: int
) -> DecodeConfig:
    """Tile sizes for the decode kernel (queries in `dtype`, cache in `kv_dtype`): the largest
    BLOCK_N whose pipelined K and V tiles fit in `smem_bytes` of shared memory per program.

    Swept on an H200 (`python -m minisgl.bench.attention --sweep`): BLOCK_N 128 with 4 warps
    reads the cache at 87-100% of the copy rate at batch 64-256 (head dim 128), against 71-93%
    with 64; two stages for 16-bit caches, three for FP8 ones, whose dots run in float16.
    """
    bd = block_d(head_dim)
    if dtype == torch.float32:
        return DecodeConfig(32 if bd <= 128 else 16, 4, 2)
    fp8 = kv_dtype == torch.float8_e4m3fn
    stages = 3 if fp8 else 2
    for block_n in (128, 64):
        tiles = stages * 2 * block_n * bd * kv_dtype.itemsize  # K and V, every stage
        if tiles + _SMEM_SLACK <= smem_bytes:
            return DecodeConfig(block_n, 4, stages, f16_dot=fp8)
    return DecodeConfig(32, 4, stages, f16_dot=fp8)


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


@functools.lru_cache(maxsize=8)
def _smem_per_block(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block))


def smem_per_block(device: torch.device) -> int:
    """Shared memory one program may use on `device`; 48 KB, the CUDA default, on CPU."""
    if device.type != "cuda":
        return 48 * 1024
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _smem_per_block(index)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; a small stand-in on CPU (the interpreter)."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _num_sms(index)


def choose_num_splits(batch_size: int, num_kv_heads: int, max_seq_len: int, sms: int) -> int:
    """Split the keys until (batch x kv heads x splits) covers about two waves of the SMs.

    Each split keeps at least _MIN_SPLIT_TOKENS keys so short contexts are not split into
    launches that cost more than they save; at most _MAX_SPLITS splits.
    """
    programs = batch_size * num_kv_heads
    target = 2 * sms
    if programs >= target:
        return 1
    want = math.ceil(target / programs)
    by_len = max(1, max_seq_len // _MIN_SPLIT_TOKENS)
    return max(1, min(want, by_len, _MAX_SPLITS))


def extend_blocks(
    extend_lens: list[int], seq_lens: list[int], block_m: int, first: int = 0
) -> list[int]:
    """Flattened (request, first token, offset) triples, one per BLOCK_M tile of new tokens of
    requests `first` onwards (the ones before are left to the decode kernel).

    Tiles are ordered by how many keys they read, most first, so the longest programs start in
    the first wave instead of trailing at the end of the grid.
    """
    tiles: list[tuple[int, int, int, int]] = []
    tok = sum(extend_lens[:first])
    for i in range(first, len(extend_lens)):
        n, prefix = extend_lens[i], seq_lens[i] - extend_lens[i]
        tiles += [(-(prefix + min(m + block_m, n)), i, tok, m) for m in range(0, n, block_m)]
        tok += n
    tiles.sort()
    return [x for _, i, tok, m in tiles for x in (i, tok, m)]


def _check(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor
) -> None:
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and out.stride(-1) == 1
    assert q.shape[1] % k_cache.shape[1] == 0, "query heads must be a multiple of kv heads"
    assert q.dtype == out.dtype, "q and out must share a dtype"
    assert k_cache.dtype == v_cache.dtype, "the K and V caches must share a dtype"
    assert k_cache.dtype in (q.dtype, torch.float8_e4m3fn), (
        f"a KV cache in {k_cache.dtype} for queries in {q.dtype}: use q's dtype or float8_e4m3fn"
    )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    req_rows: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    scale: float,
    num_splits: int,
    mid_o: torch.Tensor | None = None,
    mid_lse: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    config: DecodeConfig | None = None,
) -> None:
    """One new token per request: out[b] = attention of q[b] over the request's cached keys.

    q/out: [B, Hq, D]; with num_splits > 1, mid_o [B, Hq, S, D] and mid_lse [B, Hq, S] float32
    hold the partial results (allocated here when not given). The caches are in q's dtype or
    float8_e4m3fn, whose real values are the stored ones times k_scale / v_scale. `config`
    overrides `decode_config` (the benchmark sweeps it).
    """
    _check(q, k_cache, v_cache, out)
    bsz, hq, head_dim = q.shape
    hkv = k_cache.shape[1]
    single = num_splits == 1
    if not single:
        if mid_o is None:
            mid_o = torch.empty(bsz, hq, num_splits, head_dim, dtype=torch.float32, device=q.device)
        if mid_lse is None:
            mid_lse = torch.empty(bsz, hq, num_splits, dtype=torch.float32, device=q.device)
    mo = mid_o if mid_o is not None else out  # unused placeholders when single
    ml = mid_lse if mid_lse is not None else out
    g = hq // hkv
    bd = block_d(head_dim)
    block_h = max(16, int(triton.next_power_of_2(g)))
    cfg = config or decode_config(head_dim, q.dtype, k_cache.dtype, smem_per_block(q.device))
    f16_dot = cfg.f16_dot and k_cache.dtype == torch.float8_e4m3fn and q.dtype != torch.float32
    _decode_kernel[(bsz, hkv, num_splits)](
        q, k_cache, v_cache, out, mo, ml, req_rows, page_table, seq_lens,
        scale * _LOG2E * k_scale, v_scale, num_splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), out.stride(0), out.stride(1), page_table.stride(0),
        mo.stride(0), mo.stride(1), mo.stride(2), ml.stride(0), ml.stride(1),
        G=g, HEAD_DIM=head_dim, PAGE_SIZE=page_size, BLOCK_H=block_h,
        BLOCK_N=cfg.block_n, BLOCK_D=bd, SINGLE=single, IEEE=q.dtype == torch.float32,
        F16_DOT=f16_dot, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if not single:
        _merge_kernel[(bsz, hq)](
            mo, ml, out, num_splits,
            mo.stride(0), mo.stride(1), mo.stride(2), ml.stride(0), ml.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=bd, num_warps=1 if bd <= 64 else 2,
        )  # fmt: skip


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    blocks: torch.Tensor,
    req_rows: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    page_size: int,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Ragged new tokens attend to their request's cached prefix and causally to each other.

    q/out: [T, Hq, D]; blocks: int32 from extend_blocks(..., extend_config(head_dim,
    q.dtype).block_m), already on the device. The new tokens' K/V must already be in the
    cache, which is in q's dtype or float8_e4m3fn (real values: stored times k_scale / v_scale).
    """
    _check(q, k_cache, v_cache, out)
    head_dim = q.shape[2]
    hq, hkv = q.shape[1], k_cache.shape[1]
    cfg = extend_config(head_dim, q.dtype)
    num_blocks = blocks.numel() // 3
    if num_blocks == 0:
        return
    _extend_kernel[(num_blocks, hq)](
        q, k_cache, v_cache, out, blocks, req_rows, page_table, seq_lens, extend_lens,
        scale * _LOG2E * k_scale, v_scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), out.stride(0), out.stride(1), page_table.stride(0),
        G=hq // hkv, HEAD_DIM=head_dim, PAGE_SIZE=page_size, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_D=block_d(head_dim), IEEE=q.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
