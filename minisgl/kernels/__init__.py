"""Triton kernels (GPU path). Importing this package does not import triton; its modules do."""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported (checked once)."""
    return importlib.util.find_spec("triton") is not None


def gpu_kernels(x: torch.Tensor, name: str) -> ModuleType | None:
    """The kernel module minisgl.kernels.`name` if `x` is on a GPU and triton is installed."""
    if not x.is_cuda or not triton_available():
        return None
    return importlib.import_module(f"minisgl.kernels.{name}")
