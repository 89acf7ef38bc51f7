"""Fused sampling for rows without top-k / top-p / min-p filters (GPU path).

One program per row walks the vocabulary once: greedy rows (temperature below
minisgl.sampling_params.GREEDY_TEMPERATURE, 0 included) take the argmax of the logits; others
the argmax of logits / temperature + Gumbel noise, where the noise comes from the
same counter-based hash of (seed, step, token id) as minisgl.engine.sampler.uniform_noise.
argmax(l / T + G) with G = -log(-log u) picks the same token as the sampler's exponential
race argmax(softmax(l / T) / -log u), without materialising probabilities or noise.
The logits are scaled in float32 by 1 / T <= 1 / GREEDY_TEMPERATURE, which cannot overflow
for real logits (1 / 1e-40 would be inf).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minisgl.kernels.jit import jit
from minisgl.sampling_params import GREEDY_TEMPERATURE


@jit
def _fmix32(h):  # type: ignore[no-untyped-def]
    h = h ^ (h >> 16)
    h = h * tl.full(h.shape, 0x85EBCA6B, tl.uint32)
    h = h ^ (h >> 13)
    h = h * tl.full(h.shape, 0xC2B2AE35, tl.uint32)
    return h ^ (h >> 16)


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


def sample_rows(
    logits: torch.Tensor, temperature: torch.Tensor, row_hash: torch.Tensor
) -> torch.Tensor:
    """Token per row of logits [B, V]; temperature [B] (below GREEDY_TEMPERATURE = greedy),
    row_hash [B] int64."""
    bsz, vocab = logits.shape
    out = torch.empty(bsz, dtype=torch.int64, device=logits.device)
    if bsz:
        _sample_kernel[(bsz,)](
            logits, logits.stride(0), row_hash, temperature, out, vocab, GREEDY_TEMPERATURE,
            BLOCK=min(2048, max(16, triton.next_power_of_2(vocab))),
        )  # fmt: skip
    return out
