"""Engine configuration: one frozen dataclass, built from CLI flags or LLM(**options)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class EngineConfig:
    """Options that shape the engine; every CLI flag of `generate`/`serve` maps to one field."""

    model: str | None = None
    """HF checkpoint directory, a .gguf file (or a directory holding one), a Hugging Face hub id
    (owner/name), a preset name (see `minisgl presets`) or None for the demo model."""
    revision: str | None = None
    """Branch, tag or commit of a hub id; None: main."""
    tokenizer: str | None = None
    """A tokenizer directory or .gguf file to use instead of the model's own; None: the
    model's (a GGUF checkpoint's is built from the file's metadata)."""
    dummy_weights: bool = False
    """Random weights from the config alone (for benchmarks), like vLLM's --load-format dummy."""
    dtype: str = "auto"
    """auto | float32 | bfloat16 | float16. auto: the config's dtype on GPU, float32 on CPU."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    attention_backend: str = "auto"
    """auto (triton on CUDA, torch on CPU) | torch | triton | flashinfer | fa3 (optional)."""
    page_size: int = 16
    """Tokens per KV-cache page."""
    num_pages: int | None = None
    """KV pool size in pages; None sizes it from memory (mem_fraction on GPU, cpu_kv_gib on CPU)."""
    mem_fraction: float = 0.85
    """Fraction of total GPU memory that weights + KV cache may use."""
    cpu_kv_gib: float = 2.0
    """KV cache budget on CPU when num_pages is None."""
    max_running_requests: int = 256
    """Most requests decoding at once."""
    max_model_len: int | None = None
    """Context length (prompt + output); default the model's max_position_embeddings."""
    chunked_prefill_size: int = 8192
    """Most new tokens in one forward step; longer prompts are prefilled in chunks."""
    disable_cuda_graph: bool = False
    """Run decode steps eagerly instead of replaying captured CUDA graphs (GPU only)."""
    cuda_graph_max_bs: int = 256
    """Largest decode batch captured in a CUDA graph (capped by max_running_requests)."""
    overlap_schedule: str = "auto"
    """auto | on | off: plan and launch step N+1 while the GPU runs step N (auto: on CUDA)."""
    disable_radix_cache: bool = False
    """Recompute every prompt instead of reusing cached prefixes."""
    schedule_policy: str = "fcfs"
    """fcfs (first come, first served) | lpm (longest cached prefix first)."""
    tp_size: int = 1
    """Tensor-parallel ranks: processes that each hold 1/tp of the weights and KV heads (one
    GPU each, cuda:0..tp-1; gloo on CPU)."""
    seed: int = 0
    """Seed for dummy weights."""
    progress: bool = True
    """Show progress bars (weight loading)."""

    @staticmethod
    def from_options(model: str | None, options: dict[str, Any]) -> EngineConfig:
        """Build from keyword options, rejecting unknown names with a clear message."""
        known = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        cfg = EngineConfig(model=model, **options)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Raise ValueError on inconsistent values."""
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}"
            )
        if self.tokenizer is not None and not Path(self.tokenizer).exists():
            raise ValueError(f"tokenizer: no such directory or .gguf file: {self.tokenizer}")
        if self.page_size < 1:
            raise ValueError("page_size must be >= 1")
        if self.num_pages is not None and self.num_pages < 1:
            raise ValueError("num_pages must be >= 1")
        if self.max_running_requests < 1:
            raise ValueError("max_running_requests must be >= 1")
        if self.chunked_prefill_size < 1:
            raise ValueError("chunked_prefill_size must be >= 1")
        if self.overlap_schedule not in ("auto", "on", "off"):
            raise ValueError(
                f"overlap_schedule must be auto, on or off, not {self.overlap_schedule!r}"
            )
        if self.schedule_policy not in ("fcfs", "lpm"):
            raise ValueError(f"schedule_policy must be fcfs or lpm, not {self.schedule_policy!r}")
        if self.tp_size < 1:
            raise ValueError("tp_size must be >= 1")
        if self.tp_size > 1 and self.device.startswith("cuda:"):
            raise ValueError("with tp_size > 1 the ranks use cuda:0..tp_size-1; use --device cuda")
        if not 0.0 < self.mem_fraction <= 1.0:
            raise ValueError("mem_fraction must be in (0, 1]")
