"""The FP8 KV cache's parts on CPU: quantisation, the pool and its sizing, the torch backend
over an FP8 cache, scales read from a checkpoint, and the refusals (flags, backends)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minisgl.attention.base import (
    FP8_DTYPE,
    FP8_MAX,
    AttentionBackend,
    KVQuant,
    dequantize_fp8,
    quantize_fp8,
)
from minisgl.attention.torch_backend import TorchAttention
from minisgl.config import EngineConfig
from minisgl.engine.model_runner import ModelRunner, checkpoint_kv_scales
from minisgl.kvcache.pool import KVPool, kv_storage_dtype
from minisgl.llm import LLM
from minisgl.models.errors import ModelLoadError
from minisgl.models.source import resolve_model
from minisgl.sampling_params import SamplingParams
from tests.helpers.attn_cases import AttnCase, make_case, reference, run_backend
from tests.helpers.checkpoints import make_checkpoint


@pytest.mark.parametrize("scale", [1.0, 0.01, 3.0])
def test_round_trip_error_and_saturation(scale: float) -> None:
    gen = torch.Generator().manual_seed(0)
    # Normal range of e4m3 (2^-6 .. 448) times the scale: relative error <= 2^-4 (3 bits).
    mag = torch.exp2(torch.empty(4096).uniform_(-6, 8.8, generator=gen))
    x = mag * torch.where(torch.rand(4096, generator=gen) < 0.5, -1.0, 1.0) * scale
    q = quantize_fp8(x, scale)
    assert q.dtype == FP8_DTYPE
    back = dequantize_fp8(q, scale, torch.float32)
    assert ((back - x).abs() <= x.abs() * 2**-4 * (1 + 1e-6)).all()
    # Below the normal range the step is the smallest subnormal, 2^-9: error <= half of it.
    tiny = torch.linspace(-(2**-6), 2**-6, 257) * scale
    err = (dequantize_fp8(quantize_fp8(tiny, scale), scale, torch.float32) - tiny).abs()
    assert (err <= 2**-10 * scale * (1 + 1e-6)).all()
    # Beyond +-448 x scale (and infinities) saturate instead of becoming NaN; NaN stays NaN.
    big = torch.tensor([449.0, -1e6, 1e30, float("inf"), -float("inf")]) * scale
    got = dequantize_fp8(quantize_fp8(big, scale), scale, torch.float32)
    want = torch.tensor([FP8_MAX, -FP8_MAX, FP8_MAX, FP8_MAX, -FP8_MAX]) * scale
    torch.testing.assert_close(got, want)
    assert torch.isnan(quantize_fp8(torch.tensor([float("nan")]), scale).float()).all()


def test_quantize_takes_16_bit_inputs() -> None:
    x = torch.tensor([0.5, -300.0, 1000.0, 2**-12], dtype=torch.bfloat16)
    back = dequantize_fp8(quantize_fp8(x, 1.0), 1.0, torch.bfloat16)
    assert back.dtype == torch.bfloat16
    assert back.tolist() == [0.5, -288.0, 448.0, 0.0]


def test_kv_quant_refuses_bad_scales() -> None:
    with pytest.raises(ValueError, match="v_scales must be finite and > 0"):
        KVQuant(torch.float32, (1.0,), (0.0,))
    with pytest.raises(ValueError, match="k_scales must be finite and > 0"):
        KVQuant(torch.float32, (float("nan"),), (1.0,))
    with pytest.raises(ValueError, match="1 k_scales but 2 v_scales"):
        KVQuant(torch.float32, (1.0,), (1.0, 1.0))


def test_pool_stores_fp8_with_per_layer_scales() -> None:
    pool = KVPool(3, 4, 2, 2, 8, torch.bfloat16, torch.device("cpu"), kv_cache_dtype="fp8_e4m3")
    assert all(c.dtype == FP8_DTYPE and c.shape == (10, 2, 8) for c in pool.k_caches)
    assert pool.quant == KVQuant(torch.bfloat16, (1.0,) * 3, (1.0,) * 3)
    scaled = KVPool(
        2, 4, 2, 2, 8, torch.float32, torch.device("cpu"), "fp8_e4m3", [0.5, 2.0], [1.0, 4.0]
    )
    assert scaled.quant is not None and scaled.quant.v_scales == (1.0, 4.0)
    plain = KVPool(2, 4, 2, 2, 8, torch.bfloat16, torch.device("cpu"))
    assert plain.quant is None and plain.k_caches[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="kv scales: 1 given for 2 layers"):
        KVPool(2, 4, 2, 2, 8, torch.float32, torch.device("cpu"), "fp8_e4m3", [1.0], [1.0])
    with pytest.raises(ValueError, match="FP8 KV cache only"):
        KVPool(2, 4, 2, 2, 8, torch.float32, torch.device("cpu"), "auto", [1.0, 1.0])
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8_e4m3"):
        kv_storage_dtype("fp8", torch.float32)


def test_fp8_page_is_half_a_bf16_page_and_the_runner_gets_twice_the_pages() -> None:
    args = (30, 16, 3, 64)
    assert KVPool.bytes_per_page(*args, FP8_DTYPE) * 2 == KVPool.bytes_per_page(
        *args, torch.bfloat16
    )
    source = resolve_model(None, False)
    pages = {}
    for kv in ("auto", "fp8_e4m3"):
        cfg = EngineConfig(dtype="bfloat16", kv_cache_dtype=kv, cpu_kv_gib=2**-12, progress=False)
        runner = ModelRunner(cfg, source, max_model_len=2048)
        pages[kv] = runner.allocate_kv()
        assert runner.pool.k_caches[0].dtype == runner.kv_dtype
        quant = runner.attn.kv_quant
        assert (quant is None) == (kv == "auto")
        pool_bytes = sum(c.numel() * c.element_size() for c in runner.pool.k_caches) * 2
        assert pool_bytes == (pages[kv] + 1) * runner.page_bytes()
    assert runner.kv_dtype == FP8_DTYPE
    assert pages["fp8_e4m3"] == 2 * pages["auto"], pages


def test_flag_values_are_checked() -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype must be auto or fp8_e4m3, not 'fp8'"):
        EngineConfig.from_options(None, {"kv_cache_dtype": "fp8"})


def test_backends_without_fp8_refuse_it_naming_the_flag() -> None:
    from minisgl.attention.external import FlashAttention3, FlashInferAttention

    quant = KVQuant(torch.bfloat16, (1.0,), (1.0,))
    for cls in (FlashInferAttention, FlashAttention3):
        backend = object.__new__(cls)  # the libraries are not installed on CPU
        assert not backend.supports_fp8_kv
        with pytest.raises(ValueError, match="--kv-cache-dtype fp8_e4m3 is not supported"):
            backend.use_kv_quant(quant)
        backend.use_kv_quant(None)


def _fp8(case: AttnCase, k_scale: float, v_scale: float) -> tuple[AttnCase, AttnCase]:
    b = case.batch
    k8, v8 = quantize_fp8(b.k_caches[0], k_scale), quantize_fp8(b.v_caches[0], v_scale)
    fp8 = AttnCase(dataclasses.replace(b, k_caches=[k8], v_caches=[v8]), case.q, case.k, case.v)
    ref = AttnCase(
        dataclasses.replace(
            b,
            k_caches=[dequantize_fp8(k8, k_scale, torch.float32)],
            v_caches=[dequantize_fp8(v8, v_scale, torch.float32)],
        ),
        case.q,
        dequantize_fp8(quantize_fp8(case.k, k_scale), k_scale, torch.float32),
        dequantize_fp8(quantize_fp8(case.v, v_scale), v_scale, torch.float32),
    )
    return fp8, ref


@pytest.mark.parametrize(
    "seq_lens,extend_lens", [([5, 40, 77], [1, 1, 1]), ([30, 1, 90, 12], [1, 1, 25, 12])]
)
def test_torch_backend_reads_an_fp8_cache(seq_lens: list[int], extend_lens: list[int]) -> None:
    """Decodes and a mixed step with GQA: the FP8 output equals the float32 reference over the
    dequantised cache, and the new K/V are stored quantised with the layer's scales."""
    k_scale, v_scale = 0.25, 2.0
    case = make_case(
        seq_lens, extend_lens, page_size=4, num_q_heads=4, num_kv_heads=2, head_dim=16,
        dtype=torch.float32, seed=2,
    )  # fmt: skip
    fp8, ref = _fp8(case, k_scale, v_scale)
    expected = reference(ref)
    backend = TorchAttention(16**-0.5)
    backend.use_kv_quant(KVQuant(torch.float32, (k_scale,), (v_scale,)))
    out = run_backend(backend, fp8)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    slots = fp8.batch.out_slots
    assert torch.equal(fp8.batch.k_caches[0][slots].float() * k_scale, ref.k)
    assert torch.equal(fp8.batch.v_caches[0][slots].float() * v_scale, ref.v)
    # Against the float cache itself the output is close, not equal (FP8 rounding).
    plain = reference(case)
    assert 1e-4 < (out - plain).abs().max() < 0.2


def test_fp8_cache_without_scales_is_an_error() -> None:
    case = make_case(
        [3], [1], page_size=4, num_q_heads=2, num_kv_heads=2, head_dim=16, dtype=torch.float32
    )
    fp8, _ = _fp8(case, 1.0, 1.0)
    backend: AttentionBackend = TorchAttention(16**-0.5)
    with pytest.raises(RuntimeError, match="an FP8 KV cache needs kv_quant set"):
        run_backend(backend, fp8)


def _with_scales(ckpt: Path, scales: dict[str, float]) -> None:
    (path,) = ckpt.glob("*.safetensors")
    tensors = load_file(path)
    tensors.update({name: torch.tensor(value) for name, value in scales.items()})
    save_file(tensors, path, metadata={"format": "pt"})


def _fp8_greedy(ckpt: Path) -> tuple[KVQuant | None, list[list[int]], list[float]]:
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True, logprobs=True)
    with LLM(str(ckpt), kv_cache_dtype="fp8_e4m3", num_pages=32, progress=False) as llm:
        outs = llm.generate(["a b c d", "hello world hello"], params)
        quant = llm.runner.pool.quant
    return quant, [o.token_ids for o in outs], [lp for o in outs for lp in o.logprobs or []]


def test_scales_come_from_the_checkpoint(tmp_path: Path) -> None:
    """vLLM's names: self_attn.k_scale / v_scale, under k_proj / v_proj, or one kv_scale.

    The scales are powers of two below 1, so the stored values only move up by whole binades
    (none reach 448 in this model): the outputs equal those with scales 1.0 up to the few
    values that leave the subnormal range, and a reader that skipped a scale would not."""
    ckpt = make_checkpoint(tmp_path / "ckpt", "llama", num_hidden_layers=3)
    assert checkpoint_kv_scales(resolve_model(str(ckpt), False), 3) is None
    unscaled, want, want_lp = _fp8_greedy(ckpt)
    assert unscaled == KVQuant(torch.float32, (1.0,) * 3, (1.0,) * 3)
    _with_scales(
        ckpt,
        {
            "model.layers.0.self_attn.k_scale": 0.5,
            "model.layers.0.self_attn.v_scale": 0.25,
            "model.layers.1.self_attn.k_proj.k_scale": 0.25,
            "model.layers.2.self_attn.kv_scale": 0.125,
        },
    )
    source = resolve_model(str(ckpt), False)
    assert checkpoint_kv_scales(source, 3) == ([0.5, 0.25, 0.125], [0.25, 1.0, 0.125])
    quant, got, got_lp = _fp8_greedy(ckpt)
    assert quant == KVQuant(torch.float32, (0.5, 0.25, 0.125), (0.25, 1.0, 0.125))
    assert got == want
    # Measured: 0.003 at most; skipping the scales in the reader changes tokens and moves
    # logprobs by 0.45.
    torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(want_lp), atol=0.02, rtol=0)


def test_a_bad_checkpoint_scale_is_refused(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", "llama")
    _with_scales(ckpt, {"model.layers.1.self_attn.v_scale": -1.0})
    with pytest.raises(
        ModelLoadError, match=r"model\.layers\.1\.self_attn\.v_scale must be finite"
    ):
        checkpoint_kv_scales(resolve_model(str(ckpt), False), 2)
