"""Host <-> device copies that never make the CPU wait for the GPU.

A copy from pageable host memory to the GPU synchronises with the stream first, which would
stall the CPU until every queued kernel has run and defeat overlap scheduling; going through
pinned (page-locked) buffers keeps both directions asynchronous. A pinned source must then
stay untouched until the copy has actually run on the GPU, which with overlap scheduling can
be a step after the CPU queued it (see pytorch/pytorch#130785: freeing it earlier lets the
host allocator hand the buffer to the next copy while the first is still pending).
"""

from __future__ import annotations

from collections import deque

import torch


class HostToDevice:
    """Copies lists of numbers to a device through pinned buffers, each kept alive until an
    event recorded after its copy has completed."""

    def __init__(self) -> None:
        self._pending: deque[tuple[torch.cuda.Event, torch.Tensor]] = deque()

    def __call__(
        self, values: list[int] | list[float], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A 1-D tensor of `values` on `device`."""
        host = torch.tensor(values, dtype=dtype)
        if device.type != "cuda":
            return host
        pinned = host.pin_memory()
        out = pinned.to(device, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._pending.append((done, pinned))
        while self._pending and self._pending[0][0].query():
            self._pending.popleft()
        return out


def to_host(t: torch.Tensor) -> torch.Tensor:
    """Start copying `t` into pinned host memory; read it after an event recorded later fires
    (the caller keeps the returned tensor until then)."""
    if t.device.type == "cpu":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out
