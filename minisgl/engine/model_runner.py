"""Owns the device state: the model, the KV pool, the page table, the attention backend, the
decode graphs and the sampler. Runs a step from the scheduler's plain StepPlan."""

from __future__ import annotations

import logging

import torch

from minisgl.attention.base import AttentionBackend
from minisgl.attention.batch import ForwardBatch
from minisgl.attention.registry import create_backend, resolve_backend
from minisgl.config import EngineConfig
from minisgl.distributed.group import TPGroup
from minisgl.engine.cuda_graph import DecodeGraphs, use_decode_graphs
from minisgl.engine.sampler import SampleOutput, SamplingBatch, sample
from minisgl.engine.step import (
    LaunchedStep,
    StepPlan,
    forward_batch,
    sampling_batch,
    write_page_table,
)
from minisgl.kvcache.pool import KVPool
from minisgl.models.loader import build_model, init_dummy_weights, load_weights
from minisgl.models.source import ModelSource
from minisgl.transfer import HostToDevice, to_host

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, config_dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is the checkpoint's dtype on GPU and float32 on CPU (faster and exact there)."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return _DTYPES.get(config_dtype, torch.bfloat16)


def use_overlap(setting: str, device: torch.device) -> bool:
    """auto: overlap on CUDA only (on the CPU nothing runs asynchronously to overlap with)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


class ModelRunner:
    """Runs a CausalLM over the KV pool it owns and samples the next tokens.

    Built in two phases: the constructor loads the model; `allocate_kv` then sizes the KV pool
    from the memory left, builds the page table and captures the decode graphs over them.
    """

    def __init__(
        self,
        cfg: EngineConfig,
        source: ModelSource,
        max_model_len: int,
        tp: TPGroup | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.cfg = cfg
        self.max_model_len = max_model_len
        self.tp = tp or TPGroup()
        self.device = device or resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, source.config.dtype, self.device)
        self.model_config = source.config
        self.progress = cfg.progress and self.tp.is_leader
        self.graphs: DecodeGraphs | None = None
        mc = source.config
        self.num_kv_heads = self.tp.shard(mc.num_kv_heads, "key/value heads")
        self.model = build_model(mc, self.dtype, self.device, max_model_len, self.tp)
        if source.weights_dir is None:
            init_dummy_weights(self.model, cfg.seed)
        else:
            load_weights(self.model, source, progress=self.progress)
        backend = resolve_backend(cfg.attention_backend, self.device.type)
        self.attn: AttentionBackend = create_backend(backend, mc.head_dim**-0.5)
        log.info(
            "model %s (%s) on %s in %s, attention backend %s%s",
            source.name,
            mc.architecture,
            self.device,
            str(self.dtype).removeprefix("torch."),
            self.attn.name,
            f", tensor-parallel rank {self.tp.rank} of {self.tp.size}" if self.tp.size > 1 else "",
        )

    # ----- KV pool and page table -----------------------------------------------------------

    def page_bytes(self) -> int:
        """Memory one KV page takes across all layers, K and V."""
        mc = self.model_config
        return KVPool.bytes_per_page(
            mc.num_layers, self.cfg.page_size, self.num_kv_heads, mc.head_dim, self.dtype
        )

    def _auto_num_pages(self) -> int:
        cfg = self.cfg
        if self.device.type == "cuda":
            # The driver counts memory the caching allocator holds but no tensor uses as used.
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = int(total * cfg.mem_fraction) - used
            if budget <= 0:
                raise MemoryError(
                    f"no GPU memory left for the KV cache: {used / 2**30:.1f} GiB of "
                    f"{total / 2**30:.1f} in use, mem_fraction {cfg.mem_fraction}"
                )
        else:
            budget = int(cfg.cpu_kv_gib * 2**30)
        # Never more than every running request at full context could use.
        most = cfg.max_running_requests * -(-self.max_model_len // cfg.page_size)
        return max(1, min(budget // self.page_bytes(), most))

    def allocate_kv(self) -> int:
        """Build the KV pool, page table and `future` buffer, capture graphs; returns the pages.

        Every tensor-parallel rank gets the same number of pages: the smallest any can hold.
        """
        cfg, mc, device = self.cfg, self.model_config, self.device
        num_pages = self.num_pages = self.tp.min_int(cfg.num_pages or self._auto_num_pages())
        self.pool = KVPool(
            mc.num_layers,
            num_pages,
            cfg.page_size,
            self.num_kv_heads,
            mc.head_dim,
            self.dtype,
            device,
        )
        # One row per running request, plus a last row that points at the scratch page.
        self.page_table = torch.full(
            (cfg.max_running_requests + 1, -(-self.max_model_len // cfg.page_size)),
            self.pool.scratch_page,
            dtype=torch.int32,
            device=device,
        )
        self.overlap = use_overlap(cfg.overlap_schedule, device)
        # Sampled ids of the last two steps, which placeholders point into (step k uses half
        # k % 2: a placeholder is resolved on the host before its half is written again).
        self.future = (
            torch.zeros(2 * cfg.max_running_requests, dtype=torch.int64, device=device)
            if self.overlap
            else None
        )
        self._launches = 0
        self.h2d = HostToDevice()
        if use_decode_graphs(device, cfg.disable_cuda_graph, self.tp.size):
            self.capture_decode_graphs(
                self.page_table,
                self.pool.k_caches,
                self.pool.v_caches,
                cfg.page_size,
                scratch_page=self.pool.scratch_page,
                scratch_row=cfg.max_running_requests,
                max_bs=min(cfg.cuda_graph_max_bs, cfg.max_running_requests),
            )
        elif device.type == "cuda" and not cfg.disable_cuda_graph and self.tp.is_leader:
            log.info("tensor parallelism: decoding without CUDA graphs (see use_decode_graphs)")
        return num_pages

    def capture_decode_graphs(
        self,
        page_table: torch.Tensor,
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
        page_size: int,
        scratch_page: int,
        scratch_row: int,
        max_bs: int,
    ) -> None:
        """Capture decode CUDA graphs over this page table and KV cache (if the backend allows).

        Padding rows use page-table row `scratch_row`, whose entries all point at `scratch_page`.
        """
        if not self.attn.supports_cuda_graph:
            log.info("%s attention cannot run in CUDA graphs; decoding eagerly", self.attn.name)
            return
        self.graphs = DecodeGraphs(
            self._forward,
            self.attn,
            page_table,
            k_caches,
            v_caches,
            page_size,
            scratch_row=scratch_row,
            scratch_slot=scratch_page * page_size,
            max_bs=max_bs,
            progress=self.progress,
        )

    def weight_bytes(self) -> int:
        """Bytes the parameters take on the device."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def launch(self, plan: StepPlan) -> LaunchedStep:
        """Queue a step's page-table writes, forward and sampling; never waits for the device.

        Sampled ids go to pinned host memory (read them with `LaunchedStep.read`) and, with
        overlap, to `future[first_slot:]`, where the next step's placeholders point.
        """
        write_page_table(self.page_table, plan.table_writes, self.h2d)
        batch = forward_batch(plan, self.page_table, self.pool, self.attn, self.h2d, self.future)
        logits = self.forward(batch)
        sb = sampling_batch(
            plan.sampling, self.model_config.vocab_size, self.device, self.h2d, self.future
        )
        sampled = self.sample(logits, sb)
        first = (self._launches % 2) * self.cfg.max_running_requests
        self._launches += 1
        if self.future is not None:
            self.future[first : first + len(plan.seq_lens)] = sampled.token_ids
        host = SampleOutput(
            to_host(sampled.token_ids),
            *(
                None if t is None else to_host(t)
                for t in (sampled.logprobs, sampled.top_ids, sampled.top_logprobs)
            ),
        )
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return LaunchedStep(first, host, ready)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Next-token logits [B, vocab] float32 for each request in the batch."""
        if self.graphs is not None and self.graphs.can_run(batch):
            return self.graphs.run(batch)
        batch.attn.prepare(batch)
        return self._forward(batch)

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        logits: torch.Tensor = self.model(batch)
        return logits

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, sb: SamplingBatch) -> SampleOutput:
        """Choose tokens from the logits of `forward`."""
        return sample(logits, sb)
