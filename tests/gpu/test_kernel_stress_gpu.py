"""Many W3-like steps through the Triton attention kernels, back to back.

A single launch of each shape passes in test_triton_attention_gpu.py; a fault that shows only
now and then (W3 on an H100 ended in an illegal memory access, see benchmarks/RESULTS.md; Triton
3.6+ has reports of intermittent faults in Hopper kernels with several tl.dot) needs many
launches of varied shapes to show. Each step mixes prefill chunks with cached prefixes (up to an
8192-token budget) and decodes over long contexts, like W3's steps; outputs must stay finite
(unread slots hold NaN) and, every few steps, match the float32 reference.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.helpers.attn_cases import TOLERANCE, make_case, reference, run_backend

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def w3_like_step(rng: random.Random) -> tuple[list[int], list[int]]:
    seq_lens: list[int] = []
    extend_lens: list[int] = []
    budget = 8192
    for _ in range(rng.randint(0, 4)):  # prefill chunks, some after a cached prefix
        ext = min(budget, rng.randint(1, 4096))
        if ext <= 0:
            break
        prefix = rng.choice([0, 0, rng.randint(1, 4096)])
        seq_lens.append(prefix + ext)
        extend_lens.append(ext)
        budget -= ext
    for _ in range(rng.randint(1 if not seq_lens else 0, 96)):  # decodes
        seq_lens.append(rng.randint(1, 6144))
        extend_lens.append(1)
    return seq_lens, extend_lens


def test_many_w3_like_steps() -> None:
    assert torch.cuda.is_available(), "the gpu tests need a CUDA GPU"
    # Imported here, not at collection: importing the kernels before the CPU interpreter tests
    # set TRITON_INTERPRET would build them compiled for the whole session.
    from minisgl.attention.triton_backend import TritonAttention

    rng = random.Random(0)
    backend = TritonAttention(128**-0.5)
    dtype = torch.bfloat16
    for step in range(120):
        seq_lens, extend_lens = w3_like_step(rng)
        case = make_case(
            seq_lens,
            extend_lens,
            page_size=16,
            num_q_heads=32,
            num_kv_heads=8,
            head_dim=128,
            dtype=dtype,
            device="cuda",
            seed=step,
        )
        out = run_backend(backend, case)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), (
            f"step {step}: NaN/inf (seq {seq_lens}, ext {extend_lens})"
        )
        if step % 20 == 0:
            tol = TOLERANCE[dtype]
            expected = reference(case, per_request=True)
            torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
