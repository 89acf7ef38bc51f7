"""triton.jit with a typed signature (triton ships no type information)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import triton


def jit(fn: Callable[..., Any]) -> Any:
    """Compile `fn` as a Triton kernel (or run it in the interpreter under TRITON_INTERPRET)."""
    return triton.jit(fn)
