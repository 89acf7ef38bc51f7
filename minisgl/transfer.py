"""Host <-> device copies that never make the CPU wait for the GPU.

A copy from pageable host memory to the GPU synchronises with the stream first, which would
stall the CPU until every queued kernel has run and defeat overlap scheduling; going through
pinned (page-locked) buffers keeps both directions asynchronous.
"""

from __future__ import annotations

import torch


def to_device(
    values: list[int] | list[float], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A 1-D tensor of `values` on `device`, copied through pinned memory on CUDA."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """Start copying `t` into pinned host memory; read it after an event recorded later fires."""
    if t.device.type == "cpu":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out
