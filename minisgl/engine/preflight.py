"""Can the device and the attention backend of an EngineConfig work here? Checked before
anything heavy starts, so a bad choice is one clear error rather than a traceback from a
worker (`minisgl serve` runs this in a short-lived child process before it listens, since its
own process never imports torch)."""

from __future__ import annotations

import importlib
import os

import torch

from minisgl.attention.base import fp8_unsupported
from minisgl.attention.registry import create_backend, resolve_backend
from minisgl.config import EngineConfig
from minisgl.engine.model_runner import resolve_device

#: The module each backend needs (importing it imports the backend's library).
_BACKEND_MODULES = {
    "torch": "minisgl.attention.torch_backend",
    "triton": "minisgl.attention.triton_backend",
}


def check_device_and_backend(cfg: EngineConfig) -> None:
    """Raise ValueError, naming the flag, when cfg's device or attention backend cannot run
    here: a device other than cpu / cuda[:N], CUDA asked for without CUDA (or with fewer GPUs
    than the device index or --tp-size needs), a backend whose library does not import, a
    GPU-only backend on a CPU, or an FP8 KV cache with a backend that cannot read one."""
    device = _check_device(cfg)
    backend = resolve_backend(cfg.attention_backend, device.type)
    flag = f"--attention-backend {backend}"
    if backend in _BACKEND_MODULES:
        try:
            importlib.import_module(_BACKEND_MODULES[backend])
        except ImportError as e:
            raise ValueError(
                f"{flag} needs {backend}, which is not importable here ({e}); "
                "install it or use --attention-backend torch"
            ) from None
    else:
        if cfg.kv_cache_dtype != "auto":  # flashinfer / fa3 read only a cache of q's dtype
            raise fp8_unsupported(backend)
        create_backend(backend, 1.0)  # a clear ValueError when the library is missing
    if backend != "torch" and device.type != "cuda":
        if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            return  # the Triton interpreter runs the kernels on the CPU (tests)
        raise ValueError(
            f"{flag} needs a CUDA device, and the engine would run on {device}; "
            "use --attention-backend torch (or auto) on a CPU"
        )


def _check_device(cfg: EngineConfig) -> torch.device:
    flag = f"--device {cfg.device}"
    try:
        device = resolve_device(cfg.device)
    except RuntimeError:
        raise ValueError(f"{flag}: not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                f"torch {torch.__version__} is built without CUDA"
                if torch.version.cuda is None
                else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES)"
            )
            raise ValueError(f"{flag}: CUDA is not available here: {why}")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{flag}: only {count} CUDA device(s) visible")
        if cfg.tp_size > count:
            raise ValueError(
                f"--tp-size {cfg.tp_size} needs one CUDA device per rank; {count} visible"
            )
    elif device.type != "cpu":
        raise ValueError(f"{flag}: the engine runs on auto, cpu, cuda or cuda:N")
    return device
