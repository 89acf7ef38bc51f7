"""The GPU path's fused kernels inside the engine, on the CPU: the Triton interpreter runs them
(TRITON_INTERPRET=1, float32) with the gate to the GPU path forced open, so the decoder takes
its fused attention input (q/k norm, rotary and the K/V store in one kernel, then the backend's
`attend`) exactly where it would on a GPU, and `--disable-fused-kernels` takes it back."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from minisgl import LLM, SamplingParams

PROMPTS = [[5, 9, 33, 71, 2000, 17], list(range(40, 77)), [11]]


def _interpreted(name: str) -> Any:
    module = importlib.import_module(f"minisgl.kernels.{name}")
    first_kernel = next(v for v in vars(module).values() if "JITFunction" in type(v).__name__
                        or type(v).__name__ == "InterpretedFunction")  # fmt: skip
    if type(first_kernel).__name__ != "InterpretedFunction":
        module = importlib.reload(module)
    return module


def _generate(path: Path, **options: Any) -> list[list[int]]:
    llm = LLM(
        str(path), device="cpu", dtype="float32", attention_backend="triton",
        overlap_schedule="off", num_pages=64, progress=False, **options,
    )  # fmt: skip
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    outs = [o.token_ids for o in llm.generate(PROMPTS, params)]
    llm.scheduler.check_invariants()
    return outs


@pytest.mark.parametrize("variant", ["llama", "qwen3-qknorm", "qwen2-bias"])
def test_the_fused_attention_input_gives_the_torch_paths_tokens(
    checkpoints: dict[str, Path], variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import minisgl.kernels as ops

    fused = _interpreted("fused")
    _interpreted("attention")
    calls = 0
    real = fused.qkv_rope_store

    def counted(*args: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return real(*args)

    monkeypatch.setattr(fused, "qkv_rope_store", counted)
    ref = _generate(checkpoints[variant])  # CPU tensors: the torch layers
    assert calls == 0
    monkeypatch.setattr(ops, "_on_gpu", lambda t: True)
    got = _generate(checkpoints[variant])
    assert calls > 0, "the fused attention input did not run"
    assert got == ref
    calls = 0
    assert _generate(checkpoints[variant], disable_fused_kernels=True) == ref
    assert calls == 0, "--disable-fused-kernels still ran the fused input"
