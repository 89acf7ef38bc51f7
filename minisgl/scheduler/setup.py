"""Build the model runner and scheduler for an EngineConfig (shared by LLM and the server)."""

from __future__ import annotations

from dataclasses import dataclass

from minisgl.config import EngineConfig
from minisgl.engine.model_runner import ModelRunner
from minisgl.models.source import ModelSource, resolve_model
from minisgl.scheduler.scheduler import Scheduler


@dataclass
class Engine:
    """A loaded model and the scheduler that drives it."""

    source: ModelSource
    max_model_len: int
    runner: ModelRunner
    scheduler: Scheduler


def build_engine(cfg: EngineConfig) -> Engine:
    """Resolve the model, load it and size the KV cache."""
    source = resolve_model(cfg.model, cfg.dummy_weights)
    max_len = source.context_length(cfg.max_model_len)
    runner = ModelRunner(cfg, source, max_len)
    return Engine(source, max_len, runner, Scheduler(cfg, runner, max_len))
