"""Decode CUDA graphs must write only memory they own.

A graph keeps the address of every buffer its kernels touched during the capture. A scratch
buffer allocated outside the capture (by a warm-up run, say) and freed afterwards leaves every
replay writing into memory that the caching allocator has since handed to other tensors, or
returned to the driver. The split-KV partial-output buffers of the small-batch graphs are
such buffers when a warm-up allocates them: they are freed at the first eager step, and late in
a long run (W3 on an H100), with few requests left, the replays fault (Xid 13, "Out Of Range
Address"), most likely on memory the allocator released under memory pressure (a GPU with
memory to spare does not show it).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
import torch

from minisgl import LLM, SamplingParams

pytestmark = pytest.mark.gpu

#: Sentinels fill free space of the caching allocator's small pool (blocks up to 1 MiB, where
#: the tiny model's split-KV buffers live) in 512-byte pieces, the pool's rounding unit.
_PIECE = 128  # float32 elements
_MAX_PIECES = 400_000


def _small_pool_reserved() -> int:
    return int(torch.cuda.memory_stats()["reserved_bytes.small_pool.current"])


def _fill_free_small_pool(value: float) -> list[torch.Tensor]:
    """Tensors of `value` taking every free block of the small pool (until it has to grow)."""
    reserved = _small_pool_reserved()
    pieces: list[torch.Tensor] = []
    for _ in range(_MAX_PIECES):
        pieces.append(torch.full((_PIECE,), value, device="cuda"))
        if _small_pool_reserved() > reserved:
            return pieces
    raise AssertionError("the small pool never had to grow: the fill is not covering it")


def test_graph_replays_write_only_memory_they_own(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from minisgl.kernels import attention as attention_kernels  # not at collection (CPU tests)

    scratch: list[int] = []
    real = attention_kernels.decode_attention

    def recording(*args: Any, **kwargs: Any) -> None:
        if torch.cuda.is_current_stream_capturing():
            scratch.extend(t.data_ptr() for t in args[10:12] if t is not None)
        real(*args, **kwargs)

    monkeypatch.setattr(attention_kernels, "decode_attention", recording)
    options: dict[str, Any] = dict(device="cuda", dtype="float32", progress=False)
    llm = LLM(str(checkpoints["llama"]), max_running_requests=8, num_pages=512, **options)
    assert llm.runner.graphs is not None
    assert scratch, "the small-batch graphs should run the split-KV path (num_splits > 1)"
    params = SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)
    prompts = [[5 + i, 17, 230 + 3 * i, 41] * (3 + i) for i in range(3)]
    llm.generate(prompts[:1], params)  # an eager prefill step: the backend drops its buffers
    gc.collect()

    # 1. Every scratch buffer a graph writes lies in memory the graphs own (their pool).
    segments = torch.cuda.memory_snapshot()
    for ptr in scratch:
        seg = next(
            (s for s in segments if s["address"] <= ptr < s["address"] + s["total_size"]), None
        )
        assert seg is not None, f"a graph writes {ptr:#x}, which the allocator has released"
        assert tuple(seg["segment_pool_id"]) != (0, 0), (
            f"a graph writes {ptr:#x}, in the allocator's ordinary pool (not the graphs' own)"
        )

    # 2. Replays leave other tensors alone: sentinels over all free small-pool memory survive
    #    decode steps of batch 1-3 (the graphs with KV splits), and the tokens match eager.
    sentinels = _fill_free_small_pool(7.0)
    got = [o.token_ids for o in llm.generate(prompts, params)]
    torch.cuda.synchronize()
    overwritten = int((torch.stack(sentinels) != 7.0).any(dim=1).sum())
    assert overwritten == 0, f"graph replays overwrote {overwritten} of {len(sentinels)} tensors"
    del sentinels, llm
    eager = LLM(str(checkpoints["llama"]), disable_cuda_graph=True, num_pages=512, **options)
    assert got == [o.token_ids for o in eager.generate(prompts, params)]
