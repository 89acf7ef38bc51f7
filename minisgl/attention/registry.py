"""Attention backends by name; heavy imports happen only when a backend is chosen."""

from __future__ import annotations

from minisgl.attention.base import AttentionBackend
from minisgl.kernels import triton_available

BACKENDS = ("torch", "triton", "flashinfer", "fa3")
#: Optional libraries behind some backends, and how to install them.
_NEEDS = {
    "flashinfer": "flashinfer (pip install flashinfer-python)",
    "fa3": "FlashAttention 3 (flash_attn_interface, built from flash-attention/hopper)",
}


def resolve_backend(name: str, device_type: str) -> str:
    """'auto': our Triton kernels on CUDA when triton imports, else the torch reference.

    flashinfer and fa3 are used only when named: they have not been run on a GPU yet (see
    minisgl.attention.external), so auto does not pick them even when they import.
    """
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
    if name in _NEEDS:
        from minisgl.attention.external import FlashAttention3, FlashInferAttention

        cls = FlashInferAttention if name == "flashinfer" else FlashAttention3
        try:
            return cls(scale)
        except ImportError as e:
            raise ValueError(
                f"attention backend {name!r} needs {_NEEDS[name]}, which is not importable "
                f"here ({e}); use auto, triton or torch"
            ) from e
    raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")
