"""CUDA graphs for decode steps: captured once per batch size, replayed with padded inputs.

A decode step launches hundreds of small kernels; replaying a captured graph removes the
launch gaps. Graphs are captured at start-up for a ladder of batch sizes sharing one memory
pool; a step of batch size b replays the smallest captured size >= b, with the extra rows
pointing at a scratch KV page (seq_len 1) so they read and write nothing that matters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from tqdm import tqdm

from minisgl.attention.base import AttentionBackend
from minisgl.attention.batch import ForwardBatch

log = logging.getLogger(__name__)


def use_decode_graphs(device: torch.device, disabled: bool, tp_size: int) -> bool:
    """Whether to capture decode graphs: on CUDA unless disabled, and not yet for several ranks.

    A tensor-parallel graph would capture NCCL all-reduces made through torch.distributed. That
    has not been seen working here: a 2-GPU test capturing them did not finish within 150 s (a
    hang not yet told apart from a slow start), and SGLang reports
    ProcessGroupNCCL collectives in CUDA graphs desynchronising the ranks on replay
    (sgl-project/sglang#33775), which is why vLLM and SGLang capture a thin NCCL wrapper of their
    own. Until minisgl has one, tensor-parallel ranks decode eagerly.
    """
    return device.type == "cuda" and not disabled and tp_size == 1


def graph_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 to 64, of 16 to 256, of 32 beyond, up to max_bs."""
    sizes = [1, 2, 4, *range(8, 64, 8), *range(64, 256, 16), *range(256, 1025, 32)]
    out = [s for s in sizes if s < max_bs]
    return [*out, max_bs]


class DecodeGraphs:
    """Captured decode forwards for a fixed page table and KV pool."""

    def __init__(
        self,
        forward: Callable[[ForwardBatch], torch.Tensor],
        attn: AttentionBackend,
        page_table: torch.Tensor,
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
        page_size: int,
        scratch_row: int,
        scratch_slot: int,
        max_bs: int,
        progress: bool = True,
    ) -> None:
        device = page_table.device
        self.attn = attn
        self.page_table = page_table
        self.k_caches, self.v_caches = k_caches, v_caches
        self.page_size = page_size
        self.scratch_row, self.scratch_slot = scratch_row, scratch_slot
        self.sizes = graph_batch_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        n = self.max_bs
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.out_slots = torch.full((n,), scratch_slot, dtype=torch.int64, device=device)
        self.req_rows = torch.full((n,), scratch_row, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.extend_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device)
        # The warm-ups run on `stream`, but the buffers above, the page table and the KV pool
        # were filled by kernels queued on the current stream, which may not have run yet: a
        # warm-up reading them first sees whatever the allocator's recycled blocks held (ids far
        # out of range after another model ran in this process).
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for bs in tqdm(
                list(reversed(self.sizes)), desc="Capturing CUDA graphs", disable=not progress
            ):
                batch = self._batch(bs)
                for _ in range(2):  # warm up (Triton compiles, allocator settles)
                    attn.prepare_capture(batch)
                    forward(batch)
                # Once more right before capturing: scratch buffers the warm-up allocated came
                # from the ordinary pool and are freed at the next prepare; a graph that kept
                # their addresses would write into memory handed out (or unmapped) since. The
                # capture allocates its own, from the graphs' private pool.
                attn.prepare_capture(batch)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.outputs[bs] = forward(batch)
                self.graphs[bs] = graph
        torch.cuda.synchronize(device)
        log.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def _batch(self, bs: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            out_slots=self.out_slots[:bs],
            req_rows=self.req_rows[:bs],
            page_table=self.page_table,
            seq_lens=self.seq_lens[:bs],
            extend_lens=self.extend_lens[:bs],
            seq_lens_cpu=[1] * bs,
            extend_lens_cpu=[1] * bs,
            page_size=self.page_size,
            k_caches=self.k_caches,
            v_caches=self.v_caches,
            attn=self.attn,
        )

    def can_run(self, batch: ForwardBatch) -> bool:
        return batch.is_decode and batch.batch_size <= self.max_bs

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [B, vocab] of a decode batch, by replaying the graph of the next size up."""
        bs = batch.batch_size
        size = next(s for s in self.sizes if s >= bs)
        self.input_ids[:bs].copy_(batch.input_ids)
        self.positions[:bs].copy_(batch.positions)
        self.out_slots[:bs].copy_(batch.out_slots)
        self.req_rows[:bs].copy_(batch.req_rows)
        self.seq_lens[:bs].copy_(batch.seq_lens)
        if size > bs:  # padding rows: a 1-token sequence in the scratch page
            self.out_slots[bs:size].fill_(self.scratch_slot)
            self.req_rows[bs:size].fill_(self.scratch_row)
            self.seq_lens[bs:size].fill_(1)
        self.attn.prepare_replay(self._batch(size), batch)
        self.graphs[size].replay()
        return self.outputs[size][:bs]
