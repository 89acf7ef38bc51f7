"""Batched sampling: penalties, temperature, top-k / top-p / min-p, seeded noise, logprobs.

Everything is vectorised over the batch. Randomness comes from a counter-based hash of
(request seed, output step, token id), so a seeded request samples the same tokens whatever
else shares its batch, on any device, without a torch.Generator per request.

On CUDA the fused kernels (minisgl.kernels.fused_sample) sample every row split over the
vocabulary with the same noise and the same kept set as the torch path below, without a
host sync; `SamplingBatch.max_top_k`, when the builder knows it, lets them take fewer
top-k / top-p candidates per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minisgl.kernels import fused_sample
from minisgl.sampling_params import GREEDY_TEMPERATURE

_MASK32 = 0xFFFFFFFF


@dataclass
class Penalties:
    """Per-request penalty strengths and the token ids they apply to (padded with vocab_size)."""

    repetition: torch.Tensor  # [B] float32, 1.0 = off
    presence: torch.Tensor  # [B] float32
    frequency: torch.Tensor  # [B] float32
    seen_ids: torch.Tensor  # [B, L] int64: prompt + output ids (repetition penalty)
    output_ids: torch.Tensor  # [B, L2] int64: output ids (presence/frequency)


@dataclass
class SamplingBatch:
    """Tensors describing how each row of a [B, vocab] logits matrix is sampled."""

    temperature: torch.Tensor  # [B] float32, below GREEDY_TEMPERATURE (e.g. 0) = greedy
    top_k: torch.Tensor  # [B] int64, vocab_size when disabled
    top_p: torch.Tensor  # [B] float32
    min_p: torch.Tensor  # [B] float32
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64, tokens generated so far
    all_greedy: bool
    use_top_k: bool
    use_top_p: bool
    use_min_p: bool
    penalties: Penalties | None
    banned_ids: torch.Tensor | None  # [B, K] ids that may not be sampled yet (padded with vocab)
    want_logprobs: bool
    top_logprobs: int  # the largest top-N asked for in the batch
    # The largest top_k among the sampled rows with top-k or top-p on (vocab for a top-p row
    # without top-k); None when the builder does not know it.
    max_top_k: int | None = None
    # [B, ceil(vocab / 32)] int32: bit i of word j allows token 32 * j + i (structured output)
    grammar_bitmask: torch.Tensor | None = None


@dataclass
class SampleOutput:
    """Chosen tokens and, when asked for, their log-probabilities under the model."""

    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32
    top_ids: torch.Tensor | None  # [B, N] int64
    top_logprobs: torch.Tensor | None  # [B, N] float32


def sample(logits: torch.Tensor, sb: SamplingBatch, fused: bool = True) -> SampleOutput:
    """Pick one token per row of `logits` ([B, V] float32); logprobs are of the raw logits.
    `fused`: the Triton sampling kernels on the GPU (False: the torch path everywhere)."""
    logprobs = top_ids = top_lps = None
    if sb.want_logprobs or sb.top_logprobs:
        raw = torch.log_softmax(logits, dim=-1)
        if sb.top_logprobs:
            top_lps, top_ids = raw.topk(sb.top_logprobs, dim=-1)
    logits = _apply_constraints(logits, sb)
    ids = _sample_fused(logits, sb) if fused and logits.is_cuda else None
    if ids is None:
        ids = sample_torch(logits, sb)
    if sb.want_logprobs or sb.top_logprobs:
        logprobs = raw.gather(1, ids[:, None]).squeeze(1)
    return SampleOutput(ids, logprobs, top_ids, top_lps)


def sample_torch(logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    """Tokens of constrained logits by the torch path (any device): argmax for greedy rows,
    the exponential race over filtered_probs for the others."""
    if sb.all_greedy:
        return logits.argmax(dim=-1)
    greedy_ids = logits.argmax(dim=-1)
    greedy = sb.temperature < GREEDY_TEMPERATURE
    return torch.where(greedy, greedy_ids, _sample_random(logits, sb))


def _sample_fused(logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor | None:
    """The fused kernels' tokens, or None off the GPU path."""
    cut = sb.use_top_k or sb.use_top_p
    return fused_sample(
        logits,
        sb.temperature,
        sb.seeds,
        sb.steps,
        min_p=sb.min_p if sb.use_min_p else None,
        top_k=sb.top_k if cut else None,
        top_p=sb.top_p if sb.use_top_p else None,
        max_top_k=sb.max_top_k if cut else None,
    )


def _apply_constraints(logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    vocab = logits.shape[1]
    if sb.grammar_bitmask is not None:
        bits = torch.arange(32, dtype=torch.int32, device=logits.device)
        allowed = ((sb.grammar_bitmask[:, :, None] >> bits) & 1).flatten(1)[:, :vocab]
        logits = logits.masked_fill(allowed == 0, float("-inf"))
    if sb.penalties is not None:
        logits = apply_penalties(logits, sb.penalties)
    if sb.banned_ids is not None:
        banned = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
        banned.scatter_(1, sb.banned_ids, True)
        logits = logits.masked_fill(banned[:, :vocab], float("-inf"))
    return logits


def token_counts(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, L] ids padded with `vocab` -> [B, vocab] occurrence counts."""
    counts = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.float32, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, pen: Penalties) -> torch.Tensor:
    """HF-style repetition penalty on seen tokens; OpenAI-style presence/frequency on output."""
    vocab = logits.shape[1]
    seen = token_counts(pen.seen_ids, vocab) > 0
    rep = pen.repetition[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    out_counts = token_counts(pen.output_ids, vocab)
    logits = logits - pen.frequency[:, None] * out_counts
    return logits - pen.presence[:, None] * (out_counts > 0).float()


def filtered_probs(logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    """Softmax at each row's temperature, with mass outside top-k / top-p / min-p set to zero.

    Greedy rows (temperature below GREEDY_TEMPERATURE) get the softmax at temperature 1; the
    others are scaled in float32 by 1 / T <= 1e5, far from overflow for any real logits.
    """
    temp = sb.temperature.float()
    temp = torch.where(temp < GREEDY_TEMPERATURE, 1.0, temp)
    probs = torch.softmax(logits.float() / temp[:, None], dim=-1)
    if sb.use_min_p:
        threshold = sb.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    if sb.use_top_k or sb.use_top_p:
        # Stable: among equal probabilities the lower token id ranks first.
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        rank = torch.arange(probs.shape[1], device=probs.device)[None, :]
        drop = rank >= sb.top_k[:, None]
        if sb.use_top_p:
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            drop |= before >= sb.top_p[:, None] * sorted_probs.sum(-1, keepdim=True)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    return probs


def _sample_random(logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    probs = filtered_probs(logits, sb)
    # Exponential race: argmax p_i / E_i with E_i ~ Exp(1) draws i with probability p_i.
    u = uniform_noise(sb.seeds, sb.steps, probs.shape[1])
    return (probs / -torch.log(u)).argmax(dim=-1)


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    # MurmurHash3's finaliser on int64 tensors holding 32-bit values (products wrap mod 2**64,
    # so their low 32 bits are exact).
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def row_hash(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """[B] 32-bit hashes of (seed, step): the per-row part of uniform_noise."""
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    return _fmix32(_fmix32(_fmix32(lo ^ 0x9E3779B9) ^ hi) ^ (steps & _MASK32))


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] uniform (0, 1) numbers, a pure function of (seed, step, token id)."""
    row = row_hash(seeds, steps)
    tok = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    h = _fmix32(_fmix32((row[:, None] + tok[None, :] * 0x27D4EB2F) & _MASK32) ^ row[:, None])
    # 23 bits: (2**23 - 1 + 0.5) / 2**23 is exactly representable in float32, so u < 1 always.
    return ((h >> 9).float() + 0.5) * (1.0 / (1 << 23))
