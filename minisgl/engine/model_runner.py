"""Owns the device state: the model, the KV pool, the page table, the attention backend, the
decode graphs and the sampler. Runs a step from the scheduler's plain StepPlan."""

from __future__ import annotations

import logging
import re

import torch
from safetensors import SafetensorError, safe_open

from minisgl.attention.base import AttentionBackend, fp8_unsupported
from minisgl.attention.batch import ForwardBatch
from minisgl.attention.registry import create_backend, resolve_backend
from minisgl.config import EngineConfig
from minisgl.distributed.group import TPGroup
from minisgl.engine.cuda_graph import DecodeGraphs, use_decode_graphs
from minisgl.engine.sampler import SampleOutput, SamplingBatch, sample
from minisgl.engine.step import (
    LaunchedStep,
    PendingStep,
    StepPlan,
    forward_batch,
    sampling_batch,
    with_bitmask,
    write_page_table,
)
from minisgl.kvcache.pool import KVPool, kv_storage_dtype
from minisgl.models.errors import ModelLoadError
from minisgl.models.loader import build_model, init_dummy_weights, load_weights
from minisgl.models.source import ModelSource, checkpoint_files
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


# A layer's FP8 KV-cache scales in a checkpoint, in the names vLLM reads: self_attn.k_scale /
# v_scale, the same under k_proj / v_proj or attn, or one kv_scale for both.
_KV_SCALE = re.compile(
    r"model\.layers\.(\d+)\.self_attn\.(?:k_proj\.|v_proj\.|attn\.)?(k_scale|v_scale|kv_scale)$"
)


def checkpoint_kv_scales(
    source: ModelSource, num_layers: int
) -> tuple[list[float], list[float]] | None:
    """Per-layer (k_scales, v_scales) from a safetensors checkpoint's scale tensors, or None
    when it has none (dummy weights and GGUF files have none). A layer the checkpoint gives no
    scale keeps 1.0; a tensor of several scales (per head) gives its largest."""
    if source.weights_dir is None or source.gguf_file is not None:
        return None
    scales: dict[str, list[float]] = {"k_scale": [1.0] * num_layers, "v_scale": [1.0] * num_layers}
    found = 0
    for path in checkpoint_files(source.weights_dir):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    m = _KV_SCALE.match(name)
                    if m is None or int(m.group(1)) >= num_layers:
                        continue
                    value = float(f.get_tensor(name).float().max())
                    if not 0.0 < value < float("inf"):
                        raise ModelLoadError(f"{path.name}: {name} must be finite and > 0")
                    layer, kind = int(m.group(1)), m.group(2)
                    for key in ("k_scale", "v_scale") if kind == "kv_scale" else (kind,):
                        scales[key][layer] = value
                    found += 1
        except SafetensorError as e:
            raise ModelLoadError(f"{path}: cannot read safetensors file ({e})") from None
    return (scales["k_scale"], scales["v_scale"]) if found else None


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
        backend = resolve_backend(cfg.attention_backend, self.device.type)
        self.attn: AttentionBackend = create_backend(backend, mc.head_dim**-0.5)
        #: The pool's storage dtype, and its FP8 scales when the checkpoint has some.
        self.kv_dtype = kv_storage_dtype(cfg.kv_cache_dtype, self.dtype)
        self.kv_scales: tuple[list[float], list[float]] | None = None
        kv_desc = str(self.dtype).removeprefix("torch.")
        if cfg.kv_cache_dtype != "auto":
            if not self.attn.supports_fp8_kv:  # before the weights load
                raise fp8_unsupported(self.attn.name)
            if self.attn.name == "triton" and self.device.type == "cuda":
                cc = torch.cuda.get_device_capability(self.device)
                if cc < (8, 9):
                    raise ValueError(
                        f"--kv-cache-dtype {cfg.kv_cache_dtype} with triton attention needs a "
                        f"GPU of compute capability 8.9 or newer (Ada, Hopper); this one is "
                        f"{cc[0]}.{cc[1]}: use --kv-cache-dtype auto"
                    )
            self.kv_scales = checkpoint_kv_scales(source, mc.num_layers)
            origin = "from the checkpoint" if self.kv_scales else "1.0"
            kv_desc = f"{cfg.kv_cache_dtype} (scales {origin})"
        # What other processes (and this one's CUDA context) hold before the weights load:
        # --mem-fraction bounds this process's own share, so servers can share a GPU.
        self._used_before = 0
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            self._used_before = total - free
        # After the checks above, so that a refused flag costs no weight loading.
        self.fused = not cfg.disable_fused_kernels
        self.model = build_model(
            mc, self.dtype, self.device, max_model_len, self.tp, fused=self.fused
        )
        if source.weights_dir is None:
            init_dummy_weights(self.model, cfg.seed)
        else:
            load_weights(self.model, source, progress=self.progress)
        log.info(
            "model %s (%s) on %s in %s, attention backend %s, KV cache %s%s",
            source.name,
            mc.architecture,
            self.device,
            str(self.dtype).removeprefix("torch."),
            self.attn.name,
            kv_desc,
            f", tensor-parallel rank {self.tp.rank} of {self.tp.size}" if self.tp.size > 1 else "",
        )

    # ----- KV pool and page table -----------------------------------------------------------

    def page_bytes(self) -> int:
        """Memory one KV page takes across all layers, K and V, in the cache's dtype."""
        mc = self.model_config
        return KVPool.bytes_per_page(
            mc.num_layers, self.cfg.page_size, self.num_kv_heads, mc.head_dim, self.kv_dtype
        )

    def _auto_num_pages(self) -> int:
        cfg = self.cfg
        if self.device.type == "cuda":
            # The driver counts memory the caching allocator holds but no tensor uses as used.
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            ours = total - free - self._used_before  # weights and buffers of this process
            budget = min(int(total * cfg.mem_fraction) - ours, free)
            if budget <= 0:
                raise MemoryError(
                    f"no GPU memory left for the KV cache: this process holds "
                    f"{ours / 2**30:.1f} GiB, others {self._used_before / 2**30:.1f} GiB, of "
                    f"{total / 2**30:.1f}; mem_fraction {cfg.mem_fraction}"
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
            kv_cache_dtype=cfg.kv_cache_dtype,
            k_scales=None if self.kv_scales is None else self.kv_scales[0],
            v_scales=None if self.kv_scales is None else self.kv_scales[1],
        )
        self.attn.use_kv_quant(self.pool.quant)
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

    def launch_forward(self, plan: StepPlan) -> PendingStep:
        """Queue a step's page-table writes and forward, and copy its sampling options to the
        device; never waits for the device. Sample it with `launch_sample` before the next
        step's forward is launched."""
        write_page_table(self.page_table, plan.table_writes, self.h2d)
        batch = forward_batch(plan, self.page_table, self.pool, self.attn, self.h2d, self.future)
        logits = self.forward(batch)
        sb = sampling_batch(
            plan.sampling, self.model_config.vocab_size, self.device, self.h2d, self.future
        )
        first = (self._launches % 2) * self.cfg.max_running_requests
        self._launches += 1
        return PendingStep(first, logits, sb)

    def launch_sample(self, pending: PendingStep, bitmask: torch.Tensor | None) -> LaunchedStep:
        """Queue the sampling of a step `launch_forward` queued, its logits masked by
        `bitmask` (a host structured-output bitmask, [B, ceil(vocab / 32)] int32; None for
        none); never waits for the device.

        Sampled ids go to pinned host memory (read them with `LaunchedStep.read`) and, with
        overlap, to `future[first_slot:]`, where the next step's placeholders point.
        """
        sampled = self.sample(pending.logits, with_bitmask(pending.sampling, bitmask))
        first = pending.first_slot
        if self.future is not None:
            self.future[first : first + len(sampled.token_ids)] = sampled.token_ids
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
        return sample(logits, sb, self.fused)
