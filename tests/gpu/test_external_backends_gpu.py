"""FlashInfer and FlashAttention 3 backends against the float32 torch reference, on a GPU where
those libraries are installed. Where one is missing its tests are reported as skipped (with
that reason), never as passed."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from minisgl.attention.registry import create_backend
from tests.helpers.attn_cases import TOLERANCE, make_case, reference, run_backend

pytestmark = pytest.mark.gpu

CASES = {
    "decode": ([1, 17, 300, 1025], [1, 1, 1, 1]),
    "prefill": ([40, 129, 7], [40, 129, 7]),
    "mixed, cached prefixes": ([1, 200, 64, 513], [1, 72, 64, 1]),
}


@pytest.mark.parametrize(
    ("name", "module"), [("flashinfer", "flashinfer"), ("fa3", "flash_attn_interface")]
)
@pytest.mark.parametrize("case_name", sorted(CASES))
@pytest.mark.parametrize("page_size", [1, 16])
def test_matches_the_reference(name: str, module: str, case_name: str, page_size: int) -> None:
    assert torch.cuda.is_available(), "the gpu tests need a CUDA GPU"
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed on this machine")
    seq_lens, extend_lens = CASES[case_name]
    dtype = torch.bfloat16
    case = make_case(
        seq_lens,
        extend_lens,
        page_size=page_size,
        num_q_heads=32,
        num_kv_heads=8,
        head_dim=128,
        dtype=dtype,
        device="cuda",
    )
    # Slots the step must not read hold NaN in make_case; a library may load a whole page and
    # mask the scores, where a NaN value row would still poison P @ V: zero them instead.
    for cache in (*case.batch.k_caches, *case.batch.v_caches):
        cache.nan_to_num_(0.0)
    expected = reference(case)
    out = run_backend(create_backend(name, 128**-0.5), case)
    assert out.shape == case.q.shape
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
