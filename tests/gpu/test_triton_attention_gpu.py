"""TritonAttention against the float32 torch reference on CUDA, realistic shapes (`pytest -m gpu`).

Run on a GPU machine: `pytest -m gpu tests/gpu/test_triton_attention_gpu.py` (add `-s` for the
timing table). Without CUDA these tests fail rather than skip.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable, Iterator
from types import ModuleType

import pytest
import torch

from tests.helpers.attn_cases import TOLERANCE, AttnCase, make_case, reference, run_backend

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels() -> Iterator[ModuleType]:
    """minisgl.kernels.attention compiled for the GPU, even if interpreter tests ran first."""
    assert torch.cuda.is_available(), "CUDA is not available: the gpu tests need a CUDA GPU"
    saved = os.environ.pop("TRITON_INTERPRET", None)
    from minisgl.kernels import attention

    if type(attention._decode_kernel).__name__ == "InterpretedFunction":
        attention = importlib.reload(attention)
    yield attention
    if saved is not None:
        os.environ["TRITON_INTERPRET"] = saved


def ragged(n: int, low: int, high: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (n,), generator=gen).tolist()


def new_backend(head_dim: int, num_splits: int | None = None) -> object:
    from minisgl.attention.triton_backend import TritonAttention

    class Poisoned(TritonAttention):
        """Output and split scratch buffers start as NaN, so any element not written shows."""

        def _empty(
            self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device
        ) -> torch.Tensor:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)

    return Poisoned(head_dim**-0.5, num_splits=num_splits)


def check(case: AttnCase, num_splits: int | None = None) -> None:
    dtype, head_dim = case.q.dtype, case.q.shape[-1]
    expected = reference(case, per_request=True)
    out = run_backend(new_backend(head_dim, num_splits), case)  # type: ignore[arg-type]
    torch.cuda.synchronize()
    assert out.shape == case.q.shape and out.dtype == dtype
    assert torch.isfinite(out).all(), "NaN/inf in output: unwritten element or a poisoned slot read"
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    b = case.batch
    assert torch.equal(b.k_caches[0][b.out_slots], case.k)
    assert torch.equal(b.v_caches[0][b.out_slots], case.v)


# id -> (seq_lens, head_dim, num_q_heads, num_kv_heads, page_size)
DECODE_CASES: dict[str, tuple[list[int], int, int, int, int]] = {
    "b1-32k-gqa4": ([32768], 128, 32, 8, 16),
    "b1-len1": ([1], 128, 32, 8, 1),
    "b256-ragged2k": (ragged(256, 1, 2048, 0), 128, 32, 8, 16),
    "b64-4k-d64-mha": ([4096] * 64, 64, 16, 16, 1),
    "b8-ragged16k-d256-gqa8": (ragged(8, 1, 16384, 1), 256, 16, 2, 16),
    "b32-ragged1k-gqa7": (ragged(32, 1, 1000, 2), 128, 28, 4, 1),
    "b4-mixed-lens-gqa8": ([20000, 5, 300, 9000], 128, 64, 8, 16),
    "b128-ragged8k-gqa4-p1": (ragged(128, 1, 8192, 3), 128, 32, 8, 1),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_decode(name: str, dtype: torch.dtype) -> None:
    seq_lens, head_dim, hq, hkv, page_size = DECODE_CASES[name]
    case = make_case(
        seq_lens,
        [1] * len(seq_lens),
        page_size=page_size,
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=head_dim,
        dtype=dtype,
        device=DEVICE,
    )
    check(case)


@pytest.mark.parametrize("num_splits", [1, 7, 64])
def test_decode_forced_splits(num_splits: int) -> None:
    """Split counts the heuristic would not pick here, including splits left empty."""
    case = make_case(
        [3000, 17, 1, 640],
        [1, 1, 1, 1],
        page_size=16,
        num_q_heads=32,
        num_kv_heads=8,
        head_dim=128,
        dtype=torch.bfloat16,
        device=DEVICE,
    )
    check(case, num_splits)


def mixed_case() -> tuple[list[int], list[int]]:
    """A 2048-token chunk after 1024 cached tokens, among 200 decodes of up to 4096 tokens."""
    decodes = ragged(200, 1, 4096, 4)
    return [*decodes[:100], 1024 + 2048, *decodes[100:]], [1] * 100 + [2048] + [1] * 100


MIXED = mixed_case()

# id -> (seq_lens, extend_lens, head_dim, num_q_heads, num_kv_heads, page_size)
EXTEND_CASES: dict[str, tuple[list[int], list[int], int, int, int, int]] = {
    "prefill-4k-gqa4": ([4096], [4096], 128, 32, 8, 16),
    "chunk-2k-after-6k-p1": ([8192], [2048], 128, 32, 8, 1),
    "ragged-prefixes-gqa8": ([1000, 4017, 613, 6048], [1000, 17, 513, 2048], 128, 32, 4, 16),
    "d64-mha-p1": ([3000, 100], [3000, 50], 64, 16, 16, 1),
    "d256-gqa8": ([2500, 700, 33], [500, 700, 33], 256, 16, 2, 16),
    "mixed-chunk-and-decodes": (MIXED[0], MIXED[1], 128, 32, 8, 16),
    "many-short-prefills": (ragged(64, 1, 300, 5), ragged(64, 1, 300, 5), 128, 28, 4, 1),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(EXTEND_CASES))
def test_extend(name: str, dtype: torch.dtype) -> None:
    seq_lens, extend_lens, head_dim, hq, hkv, page_size = EXTEND_CASES[name]
    case = make_case(
        seq_lens,
        extend_lens,
        page_size=page_size,
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=head_dim,
        dtype=dtype,
        device=DEVICE,
        seed=1,
    )
    check(case)


def test_float32() -> None:
    """float32 on the GPU (exact IEEE dots, smaller tiles) still matches."""
    case = make_case(
        [700, 300],
        [700, 1],
        page_size=16,
        num_q_heads=8,
        num_kv_heads=2,
        head_dim=128,
        dtype=torch.float32,
        device=DEVICE,
    )
    check(case)
    decode = make_case(
        [5000, 300],
        [1, 1],
        page_size=16,
        num_q_heads=8,
        num_kv_heads=2,
        head_dim=256,
        dtype=torch.float32,
        device=DEVICE,
    )
    check(decode, 4)


def _time_ms(fn: Callable[[], object], iters: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(sorted(times)[len(times) // 2])


TIMING = [
    ("decode b1 32k", [32768], [1]),
    ("decode b64 4k", [4096] * 64, [1] * 64),
    ("decode b256 2k", [2048] * 256, [1] * 256),
    ("prefill 4k", [4096], [4096]),
    ("chunk 2k after 6k", [8192], [2048]),
]


def test_timing() -> None:
    """Median forward time of one layer (Llama-3-8B heads: 32/8, d128, pages of 16), bf16."""
    from minisgl.attention.torch_backend import TorchAttention
    from minisgl.attention.triton_backend import TritonAttention

    print()
    for label, seq, ext in TIMING:
        case = make_case(
            seq,
            ext,
            page_size=16,
            num_q_heads=32,
            num_kv_heads=8,
            head_dim=128,
            dtype=torch.bfloat16,
            device=DEVICE,
        )
        b = case.batch
        times = {}
        for backend in (TritonAttention(128**-0.5), TorchAttention(128**-0.5)):
            backend.prepare(b)
            step = functools.partial(backend.forward, case.q, case.k, case.v, 0, b)
            times[backend.name] = _time_ms(step)
        splits = ""
        if b.is_decode:
            tb = TritonAttention(128**-0.5)
            tb.prepare(b)
            splits = f" splits={tb.num_splits}"
        print(
            f"{label:>20}: triton {times['triton']:8.3f} ms  torch {times['torch']:8.3f} ms"
            f"  speedup {times['torch'] / times['triton']:6.1f}x{splits}"
        )
        del case, b
        torch.cuda.empty_cache()


@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_every_tile_config_the_benchmark_sweeps(
    compiled_kernels: ModuleType, head_dim: int
) -> None:
    """Each DecodeConfig `python -m minisgl.bench.attention --sweep` times gives the reference
    output (bf16 queries and cache), with one split and with several."""
    from minisgl.bench.attention import configs

    case = make_case(
        [3000, 17, 1, 640], [1] * 4, page_size=16, num_q_heads=16, num_kv_heads=8,
        head_dim=head_dim, dtype=torch.bfloat16, device=DEVICE,
    )  # fmt: skip
    expected = reference(case, per_request=True)
    b = case.batch
    b.k_caches[0][b.out_slots] = case.k
    b.v_caches[0][b.out_slots] = case.v
    tol = TOLERANCE[torch.bfloat16]
    for cfg in configs(head_dim, fp8=False):
        for splits in (1, 5):
            out = torch.full_like(case.q, float("nan"))
            compiled_kernels.decode_attention(
                case.q, b.k_caches[0], b.v_caches[0], out, b.req_rows, b.page_table,
                b.seq_lens, b.page_size, head_dim**-0.5, splits, config=cfg,
            )  # fmt: skip
            torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol, msg=str(cfg))
