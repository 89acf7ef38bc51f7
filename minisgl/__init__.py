"""minisgl: a compact, fast LLM inference engine served over gRPC."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from minisgl.llm import LLM
    from minisgl.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    # Lazy so that `import minisgl` (e.g. by the gRPC frontend) does not pull in torch.
    if name == "LLM":
        from minisgl.llm import LLM

        return LLM
    if name == "SamplingParams":
        from minisgl.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
