"""TritonAttention against TorchAttention on CPU, through the Triton interpreter.

TRITON_INTERPRET must be set before triton decorates the kernels, so it is set here, at import;
the `interpreted_kernels` fixture also reloads the kernel module should a GPU test in the same
session have built it compiled. The interpreter's bfloat16 is not exact, so these tests use
float32 and float16; tests/gpu/test_triton_attention_gpu.py covers bfloat16 and real shapes.
Shapes are tiny (the interpreter runs every program in Python) but chosen so that requests span
several KV tiles, several query blocks and several KV splits, with empty splits and ragged tails.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
from collections.abc import Iterator
from types import ModuleType

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from minisgl.attention.registry import create_backend
from tests.helpers.attn_cases import TOLERANCE, AttnCase, make_case, reference, run_backend


@pytest.fixture(scope="module", autouse=True)
def interpreted_kernels() -> Iterator[ModuleType]:
    """minisgl.kernels.attention with its kernels built by the interpreter."""
    os.environ["TRITON_INTERPRET"] = "1"
    from minisgl.kernels import attention

    if type(attention._decode_kernel).__name__ != "InterpretedFunction":
        attention = importlib.reload(attention)
    yield attention


def poisoned_backend(scale: float, num_splits: int | None) -> object:
    from minisgl.attention.triton_backend import TritonAttention

    class Poisoned(TritonAttention):
        """Output and split scratch buffers start as NaN, so any element not written shows."""

        def _empty(
            self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device
        ) -> torch.Tensor:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)

    return Poisoned(scale, num_splits=num_splits)


def check(case: AttnCase, num_splits: int | None = None) -> None:
    dtype = case.q.dtype
    expected = reference(case)
    backend = poisoned_backend(case.q.shape[-1] ** -0.5, num_splits)
    out = run_backend(backend, case)  # type: ignore[arg-type]
    assert out.shape == case.q.shape and out.dtype == dtype
    assert torch.isfinite(out).all(), "NaN/inf in output: unwritten element or a poisoned slot read"
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    b = case.batch
    assert torch.equal(b.k_caches[0][b.out_slots], case.k)
    assert torch.equal(b.v_caches[0][b.out_slots], case.v)


DTYPES = [torch.float32, torch.float16]


# (seq_lens, page_size, num_q_heads, num_kv_heads, head_dim, num_splits)
DECODE_CASES = [
    # Three splits of 32-key tiles (64 in fp16): short requests leave splits empty.
    ([1, 5, 40, 77], 1, 4, 2, 16, 3),
    # GQA 4, pages of 4, automatic split choice (one split on CPU: the single-pass path).
    ([3, 64, 130], 4, 4, 1, 64, None),
    # No GQA, head_dim 24 padded to 32, two splits.
    ([9, 100], 4, 2, 2, 24, 2),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seq_lens,page_size,hq,hkv,head_dim,splits", DECODE_CASES)
def test_decode(
    seq_lens: list[int],
    page_size: int,
    hq: int,
    hkv: int,
    head_dim: int,
    splits: int | None,
    dtype: torch.dtype,
) -> None:
    case = make_case(
        seq_lens,
        [1] * len(seq_lens),
        page_size=page_size,
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=head_dim,
        dtype=dtype,
    )
    check(case, splits)


# (seq_lens, extend_lens, page_size, num_q_heads, num_kv_heads, head_dim)
EXTEND_CASES = [
    # Prefixes 1, 5 and 13; the 70 new tokens span two 64-row query blocks in fp32, and the
    # second block's causal tail starts a new 32-key tile.
    ([71, 9, 33], [70, 4, 20], 4, 4, 2, 16),
    # GQA 4, one-token pages, a long prefill after 10 cached tokens and a fresh one.
    ([150, 40], [140, 40], 1, 4, 1, 64),
    # Mixed: decodes around a prefill chunk that continues after 65 cached tokens.
    ([30, 1, 90, 12], [1, 1, 25, 1], 4, 2, 2, 64),
    # Three leading decodes (the decode kernel), then a chunk and a one-token chunk (extend).
    ([30, 1, 77, 90, 12], [1, 1, 1, 25, 1], 4, 4, 2, 16),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seq_lens,extend_lens,page_size,hq,hkv,head_dim", EXTEND_CASES)
def test_extend(
    seq_lens: list[int],
    extend_lens: list[int],
    page_size: int,
    hq: int,
    hkv: int,
    head_dim: int,
    dtype: torch.dtype,
) -> None:
    case = make_case(
        seq_lens,
        extend_lens,
        page_size=page_size,
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=head_dim,
        dtype=dtype,
        seed=1,
    )
    check(case)


def test_two_steps_reuse_backend() -> None:
    """One backend object over an extend step then a decode step, as the model runner uses it."""
    backend = create_backend("triton", 16**-0.5)
    assert backend.name == "triton"
    kw = dict(page_size=4, num_q_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float32)
    for seq, ext in (([20, 7], [20, 3]), ([21, 8], [1, 1])):
        case = make_case(seq, ext, **kw)  # type: ignore[arg-type]
        expected = reference(case)
        out = run_backend(backend, case)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_choose_num_splits(interpreted_kernels: ModuleType) -> None:
    choose = interpreted_kernels.choose_num_splits
    # Batch 1, 8 kv heads, 32k context on 132 SMs: enough splits for two waves.
    assert choose(1, 8, 32768, 132) == math.ceil(2 * 132 / 8)
    # A large batch fills the GPU without splitting.
    assert choose(256, 8, 32768, 132) == 1
    # Short contexts are not split below the minimum keys per split.
    assert choose(1, 8, 100, 132) == 1
    assert choose(1, 8, 512, 132) == 4
    # Few heads and a huge context stop at the maximum.
    assert choose(1, 1, 1 << 20, 132) == 64


def test_extend_blocks(interpreted_kernels: ModuleType) -> None:
    # Requests of 3, 130 (after 10 cached) and 1 (after 199 cached) new tokens, 64-row tiles.
    blocks = interpreted_kernels.extend_blocks([3, 130, 1], [3, 140, 200], 64)
    triples = [tuple(blocks[i : i + 3]) for i in range(0, len(blocks), 3)]
    # Most keys first: 200, 140, 138, 74, 3.
    assert triples == [(2, 133, 0), (1, 3, 128), (1, 3, 64), (1, 3, 0), (0, 0, 0)]


def test_extend_blocks_after_leading_decodes(interpreted_kernels: ModuleType) -> None:
    # The first request (one token) is left to the decode kernel: tiles of the others only,
    # with the same absolute request and token indices.
    blocks = interpreted_kernels.extend_blocks([1, 130, 1], [41, 140, 200], 64, first=1)
    triples = [tuple(blocks[i : i + 3]) for i in range(0, len(blocks), 3)]
    assert triples == [(2, 131, 0), (1, 1, 128), (1, 1, 64), (1, 1, 0)]


def test_mixed_step_runs_its_leading_decodes_in_the_decode_kernel(
    interpreted_kernels: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decodes batched with a prefill chunk read their keys once per kv head (decode kernel),
    not once per query head in a mostly empty 128-row tile (extend kernel)."""
    calls: list[tuple[str, int]] = []
    for name in ("decode_attention", "extend_attention"):
        real = getattr(interpreted_kernels, name)

        def counted(*args: object, _real: object = real, _name: str = name) -> None:
            q = args[0]
            assert isinstance(q, torch.Tensor)
            calls.append((_name, q.shape[0]))
            _real(*args)  # type: ignore[operator]

        monkeypatch.setattr(interpreted_kernels, name, counted)
    case = make_case(
        [30, 1, 77, 90],
        [1, 1, 1, 25],
        page_size=4,
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=16,
        dtype=torch.float32,
        seed=3,
    )
    check(case, num_splits=2)
    assert calls == [("decode_attention", 3), ("extend_attention", 28)]


# FP8 caches: the interpreter loads float8_e4m3fn (the kernels convert each tile to q's dtype).
# k_scale below 1 and v_scale above it, so a scale applied twice, not at all or swapped shows.
FP8_SCALES = (0.25, 2.0)


def fp8_case(case: AttnCase, k_scale: float, v_scale: float) -> tuple[AttnCase, AttnCase]:
    """(the case over FP8 caches, its float32 reference case): the reference holds the
    dequantised caches and new K/V rounded through FP8 as the store will round them."""
    from minisgl.attention.base import dequantize_fp8, quantize_fp8

    b = case.batch
    k8, v8 = quantize_fp8(b.k_caches[0], k_scale), quantize_fp8(b.v_caches[0], v_scale)
    fp8 = AttnCase(dataclasses.replace(b, k_caches=[k8], v_caches=[v8]), case.q, case.k, case.v)
    ref_caches = dict(
        k_caches=[dequantize_fp8(k8, k_scale, torch.float32)],
        v_caches=[dequantize_fp8(v8, v_scale, torch.float32)],
    )
    ref = AttnCase(
        dataclasses.replace(b, **ref_caches),  # type: ignore[arg-type]
        case.q.float(),
        dequantize_fp8(quantize_fp8(case.k, k_scale), k_scale, torch.float32),
        dequantize_fp8(quantize_fp8(case.v, v_scale), v_scale, torch.float32),
    )
    return fp8, ref


def check_fp8(case: AttnCase, num_splits: int | None = None) -> None:
    from minisgl.attention.base import KVQuant

    k_scale, v_scale = FP8_SCALES
    fp8, ref = fp8_case(case, k_scale, v_scale)
    expected = reference(ref)
    backend = poisoned_backend(case.q.shape[-1] ** -0.5, num_splits)
    backend.use_kv_quant(KVQuant(case.q.dtype, (k_scale,), (v_scale,)))  # type: ignore[attr-defined]
    out = run_backend(backend, fp8)  # type: ignore[arg-type]
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    assert torch.isfinite(out).all(), "NaN/inf in output: unwritten element or a poisoned slot read"
    tol = TOLERANCE[case.q.dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    b = fp8.batch
    assert b.k_caches[0].dtype == torch.float8_e4m3fn
    # The stored new K/V are the reference's, quantised with the layer's scales.
    assert torch.equal(b.k_caches[0][b.out_slots].float() * k_scale, ref.k)
    assert torch.equal(b.v_caches[0][b.out_slots].float() * v_scale, ref.v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "seq_lens,page_size,hq,hkv,head_dim,splits", [DECODE_CASES[0], DECODE_CASES[2]]
)
def test_decode_fp8_cache(
    seq_lens: list[int],
    page_size: int,
    hq: int,
    hkv: int,
    head_dim: int,
    splits: int | None,
    dtype: torch.dtype,
) -> None:
    case = make_case(
        seq_lens,
        [1] * len(seq_lens),
        page_size=page_size,
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=head_dim,
        dtype=dtype,
        seed=4,
    )
    check_fp8(case, splits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "seq_lens,extend_lens,page_size,hq,hkv,head_dim", [EXTEND_CASES[0], EXTEND_CASES[3]]
)
def test_extend_fp8_cache(
    seq_lens: list[int],
    extend_lens: list[int],
    page_size: int,
    hq: int,
    hkv: int,
    head_dim: int,
    dtype: torch.dtype,
) -> None:
    """Prefill chunks after cached prefixes, and a mixed step (decode kernel, then extend)."""
    case = make_case(
        seq_lens,
        extend_lens,
        page_size=page_size,
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=head_dim,
        dtype=dtype,
        seed=5,
    )
    check_fp8(case, num_splits=2)


def test_store_kv_fp8_kernel(interpreted_kernels: ModuleType) -> None:
    """The CUDA store kernel's indexing, strides, scales and saturation, in the interpreter.

    The interpreter's float-to-FP8 rounding is wrong just below powers of two (the kernel
    module's docstring), so the inputs are FP8 values times the scale (a power of two: exact)
    plus values far beyond the range; tests/gpu/test_fp8_kv_gpu.py checks rounding on random
    values against torch."""
    gen = torch.Generator().manual_seed(6)
    tokens, heads, dim, k_scale, v_scale = 5, 3, 24, 0.25, 4.0
    byte_values = torch.randint(0, 256, (tokens, 3 * heads, dim), generator=gen, dtype=torch.uint8)
    exact = byte_values.view(torch.float8_e4m3fn).float()
    exact = torch.where(torch.isnan(exact), 1.0, exact)  # NaN bytes: a plain value instead
    big = torch.tensor([1e6, -1e6, 449.0 * 8, -449.0 * 8])  # saturate
    exact[0, heads, :4] = exact[1, 2 * heads, :4] = big
    qkv = exact.clone()  # a fused projection's output: k and v are strided views of it
    qkv[:, heads : 2 * heads] *= k_scale
    qkv[:, 2 * heads :] *= v_scale
    k, v = qkv[:, heads : 2 * heads], qkv[:, 2 * heads :]
    assert not k.is_contiguous()
    k_cache = torch.zeros(16, heads, dim, dtype=torch.float8_e4m3fn)
    v_cache = torch.zeros(16, heads, dim, dtype=torch.float8_e4m3fn)
    slots = torch.tensor([9, 2, 15, 0, 4])
    interpreted_kernels.store_kv_fp8(k, v, k_cache, v_cache, slots, k_scale, v_scale)
    from minisgl.attention.base import quantize_fp8

    want_k, want_v = quantize_fp8(k, k_scale), quantize_fp8(v, v_scale)
    assert want_k[0, 0, :4].float().tolist() == [448.0, -448.0, 448.0, -448.0]
    assert torch.equal(k_cache[slots].view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(v_cache[slots].view(torch.uint8), want_v.view(torch.uint8))
    untouched = torch.ones(16, dtype=torch.bool)
    untouched[slots] = False
    assert (k_cache[untouched].float() == 0).all() and (v_cache[untouched].float() == 0).all()
