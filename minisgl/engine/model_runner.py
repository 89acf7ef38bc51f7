"""Owns the model on its device: builds and loads it, runs forward steps, samples."""

from __future__ import annotations

import logging

import torch

from minisgl.attention.base import AttentionBackend, ForwardBatch
from minisgl.attention.registry import create_backend, resolve_backend
from minisgl.config import EngineConfig
from minisgl.distributed.group import TPGroup
from minisgl.engine.cuda_graph import DecodeGraphs
from minisgl.engine.sampler import SampleOutput, SamplingBatch, sample
from minisgl.models.loader import build_model, init_dummy_weights, load_weights
from minisgl.models.source import ModelSource

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


class ModelRunner:
    """Runs a CausalLM over ForwardBatches and samples the next tokens."""

    def __init__(
        self,
        cfg: EngineConfig,
        source: ModelSource,
        max_model_len: int,
        tp: TPGroup | None = None,
        device: torch.device | None = None,
    ) -> None:
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
