"""Where tensor-parallel ranks meet (imports no torch: the frontend process uses it)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
