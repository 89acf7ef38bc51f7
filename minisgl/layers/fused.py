"""Access to the fused Triton kernels for CUDA tensors (None where triton is missing)."""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType

import torch


@functools.cache
def _kernels() -> ModuleType | None:
    if importlib.util.find_spec("triton") is None:
        return None
    from minisgl.kernels import fused

    return fused


def fused_for(x: torch.Tensor) -> ModuleType | None:
    """minisgl.kernels.fused if `x` is on a GPU and triton is installed, else None."""
    return _kernels() if x.is_cuda else None
