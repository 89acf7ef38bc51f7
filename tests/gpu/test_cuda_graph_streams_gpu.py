"""Graph capture must not read buffers before the kernels that fill them have run.

Decode graphs are warmed up and captured on a side stream, while their static input buffers,
the page table and the KV pool are filled by kernels queued on the current stream. Unless the
side stream waits for those, a warm-up reads whatever the caching allocator's recycled blocks
held. In a fresh process freshly mapped memory is zero, so nothing shows; after another model
ran in the same process (HF transformers' `generate`, say) the blocks hold old data, and a
warm-up's embedding or KV write indexes far out of range ("vectorized gather kernel index out
of bounds" at start-up, never with CUDA_LAUNCH_BLOCKING=1).

The test makes that reproducible: it captures once (so that every kernel is loaded: with lazy
module loading a kernel's first launch synchronises, which is why a fresh process, or a first
capture, never shows the race), fills every free block of the allocator's small pool with huge
ids and frees them, then delays the current stream with a sleep kernel so that the fills of the
next capture's buffers cannot have run when its warm-up starts. A device-side assert ends the
CUDA context, so it runs in a child process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.gpu

_SCRIPT = textwrap.dedent(
    """
    import torch
    from minisgl.config import EngineConfig
    from minisgl.engine.model_runner import ModelRunner
    from minisgl.kvcache.pool import KVPool
    from minisgl.models.source import resolve_model

    cfg = EngineConfig(dtype="float32", device="cuda")
    source = resolve_model(None, False)
    runner = ModelRunner(cfg, source, max_model_len=256)
    mc = source.config
    max_requests = 32

    def capture():
        pool = KVPool(mc.num_layers, 64, 16, mc.num_kv_heads, mc.head_dim, torch.float32,
                      torch.device("cuda"))
        page_table = torch.full((max_requests + 1, 16), pool.scratch_page, dtype=torch.int32,
                                device="cuda")
        runner.capture_decode_graphs(page_table, pool.k_caches, pool.v_caches, 16,
                                     scratch_page=pool.scratch_page, scratch_row=max_requests,
                                     max_bs=max_requests)

    # Once, so that every kernel is compiled and loaded: with lazy module loading the first launch
    # of a kernel synchronises, which would hide the race (as it does in a fresh process).
    capture()
    torch.cuda.synchronize()
    runner.graphs = None

    # Poison: every free block of the small pool (in 512-byte pieces, its rounding unit, until
    # it has to grow) holds ids far out of any range, then is freed back to the allocator.
    def reserved():
        return torch.cuda.memory_stats()["reserved_bytes.small_pool.current"]
    start, poison = reserved(), []
    while reserved() == start and len(poison) < 400_000:
        poison.append(torch.full((64,), 1 << 40, dtype=torch.int64, device="cuda"))
    assert reserved() > start, "the poison did not cover the small pool"
    torch.cuda.synchronize()
    del poison

    torch.cuda._sleep(4_000_000_000)  # ~2 s of the current stream before the fills below
    capture()
    torch.cuda.synchronize()
    assert runner.graphs is not None and runner.graphs.sizes[-1] == max_requests
    print("captured", runner.graphs.sizes)
    """
)


def test_capture_waits_for_the_buffers_it_reads() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "captured" in proc.stdout
