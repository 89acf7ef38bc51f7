"""Attention backends by name; heavy imports happen only when a backend is chosen."""

from __future__ import annotations

from minisgl.attention.base import AttentionBackend
from minisgl.kernels import triton_available

BACKENDS = ("torch", "triton")


def resolve_backend(name: str, device_type: str) -> str:
    """'auto': our Triton kernels on CUDA when triton imports, else the torch reference."""
    if name != "auto":
        return name
    if device_type == "cuda" and triton_available():
        return "triton"
    return "torch"


def create_backend(name: str, scale: float) -> AttentionBackend:
    """Instantiate the backend called `name` (see BACKENDS)."""
    if name == "torch":
        from minisgl.attention.torch_backend import TorchAttention

        return TorchAttention(scale)
    if name == "triton":
        from minisgl.attention.triton_backend import TritonAttention

        return TritonAttention(scale)
    raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")
