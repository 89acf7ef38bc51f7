"""Engine configuration: one frozen dataclass, built from CLI flags or LLM(**options).

Each field's metadata is the one source of its documentation and of its command-line flag
(`minisgl.cli.add_engine_args` builds the flags from it): `help` is the text `--help` shows,
`choices` the values the flag accepts, and `flag` a flag name other than `--field-name`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def option(default: T, help: str, *, choices: tuple[str, ...] = (), flag: str = "") -> T:
    """A field with default `default` documented by `help` (also its flag's --help text).

    `choices`: the only values accepted (the flag refuses others, `check` too); `flag`: the
    flag's name when it is not `--` + the field name with dashes (a bool that defaults to True
    needs one: its flag turns it off)."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


@dataclass(frozen=True)
class EngineConfig:
    """Options that shape the engine; every CLI flag of `generate`/`serve` maps to one field."""

    model: str | None = option(
        None,
        "HF checkpoint directory, .gguf file (or a directory holding one), Hugging Face hub id "
        "(owner/name, fetched into the HF cache: HF_HOME, HF_HUB_OFFLINE and HF_TOKEN apply) "
        "or preset name (`minisgl presets`); default: the built-in demo model (random weights)",
    )
    revision: str | None = option(None, "branch, tag or commit of a hub id (default: main)")
    tokenizer: str | None = option(
        None,
        "tokenizer directory or .gguf file to use instead of the model's own "
        "(default: the model's; a GGUF checkpoint's comes from the file)",
    )
    dummy_weights: bool = option(
        False,
        "random weights from the config alone (benchmarks, presets), like vLLM's --load-format "
        "dummy. A preset has no tokenizer: the demo one encodes text prompts, but its output "
        "has no text (generate and chat print the token ids; over gRPC the text is empty, read "
        "token_ids)",
    )
    dtype: str = option(
        "auto",
        "auto: the config's dtype on GPU, float32 on CPU",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    attention_backend: str = option(
        "auto",
        "auto: our Triton kernels on CUDA (when triton imports), torch on CPU. flashinfer / fa3 "
        "need those libraries installed, are used only when named and have not been run on a "
        "GPU yet",
        choices=("auto", "torch", "triton", "flashinfer", "fa3"),
    )
    kv_cache_dtype: str = option(
        "auto",
        "auto: the model's dtype. fp8_e4m3: K and V stored as float8_e4m3fn (half the bytes of "
        "bf16, about twice the pages), quantised with one scale per layer for K and one for V: "
        "the checkpoint's k_scale / v_scale tensors when it has them, else 1.0 (as vLLM does "
        "without calibration); values beyond +-448 x scale saturate. Attention dequantises and "
        "accumulates in float32. triton and torch attention only",
        choices=("auto", "fp8_e4m3"),
    )
    page_size: int = option(16, "tokens per KV-cache page")
    num_pages: int | None = option(
        None,
        "KV pool size in pages (default: sized from memory, by mem-fraction on GPU and "
        "cpu-kv-gib on CPU)",
    )
    mem_fraction: float = option(
        0.85,
        "fraction of the GPU's memory this process may take for weights + KV cache (memory "
        "other processes hold does not count against it, so servers can share a GPU)",
    )
    cpu_kv_gib: float = option(2.0, "KV cache budget on CPU, GiB, when num-pages is not given")
    max_running_requests: int = option(256, "most requests in the running batch")
    max_model_len: int | None = option(
        None, "context length (prompt + output); default the model's max_position_embeddings"
    )
    chunked_prefill_size: int = option(
        8192, "most new tokens per forward step (long prompts are prefilled in chunks)"
    )
    disable_cuda_graph: bool = option(
        False, "run decode steps eagerly instead of replaying CUDA graphs (GPU only)"
    )
    disable_fused_kernels: bool = option(
        False,
        "run the torch versions of the fused Triton kernels (RMSNorm, rotary with the K/V "
        "store, SiLU-and-mul, MoE, sampling) on the GPU, e.g. to measure what they save",
    )
    cuda_graph_max_bs: int = option(
        256, "largest decode batch put in a CUDA graph (capped by max-running-requests)"
    )
    overlap_schedule: str = option(
        "auto",
        "prepare and launch step N+1 on the CPU while the GPU runs step N "
        "(auto: on with CUDA, off on CPU where nothing runs asynchronously)",
        choices=("auto", "on", "off"),
    )
    disable_radix_cache: bool = option(
        False, "recompute every prompt instead of reusing cached prefixes"
    )
    schedule_policy: str = option(
        "fcfs",
        "fcfs: first come first served; lpm: longest cached prefix first",
        choices=("fcfs", "lpm"),
    )
    tp_size: int = option(
        1,
        "tensor-parallel ranks: processes that each hold 1/N of the weights and KV heads "
        "(one GPU each, cuda:0..N-1; gloo on CPU)",
    )
    seed: int = option(0, "seed for the dummy weights")
    progress: bool = option(
        True, "hide progress bars (weight loading, downloads)", flag="--no-progress"
    )

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
        for f in fields(self):
            choices: tuple[str, ...] = f.metadata["choices"]
            value = getattr(self, f.name)
            if choices and value not in choices:
                allowed = f"{', '.join(choices[:-1])} or {choices[-1]}"
                raise ValueError(f"{f.name} must be {allowed}, not {value!r}")
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
        if self.tp_size < 1:
            raise ValueError("tp_size must be >= 1")
        if self.tp_size > 1 and self.device.startswith("cuda:"):
            raise ValueError("with tp_size > 1 the ranks use cuda:0..tp_size-1; use --device cuda")
        if not 0.0 < self.mem_fraction <= 1.0:
            raise ValueError("mem_fraction must be in (0, 1]")
