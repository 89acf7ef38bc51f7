"""triton.jit with a typed signature (triton ships no type information)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import triton


def jit(fn: Callable[..., Any]) -> Any:
    """Compile `fn` as a Triton kernel (or run it in the interpreter under TRITON_INTERPRET)."""
    return triton.jit(fn)


def jit_varying(*names: str) -> Callable[[Callable[..., Any]], Any]:
    """`jit`, without specialising the integer arguments `names`.

    Triton compiles a kernel again for each new combination of its integer arguments being 1
    or a multiple of 16; arguments that vary from step to step would compile variants in the
    middle of serving, stalling a step for a second or more.
    """

    def compile_(fn: Callable[..., Any]) -> Any:
        return triton.jit(fn, do_not_specialize=list(names))

    return compile_
