"""The engine: a model runner and the scheduler that drives it, built for an EngineConfig
(shared by LLM and the server), and the processes of the other tensor-parallel ranks."""

from __future__ import annotations

import logging
import multiprocessing
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess

import torch

from minisgl.config import EngineConfig
from minisgl.distributed.group import TPGroup, destroy_tp, init_tp
from minisgl.distributed.rendezvous import free_port
from minisgl.engine.model_runner import ModelRunner, resolve_device
from minisgl.models.source import ModelSource, resolve_model
from minisgl.scheduler.scheduler import Scheduler

log = logging.getLogger(__name__)

FOLLOWER_JOIN_S = 30.0


@dataclass
class Engine:
    """A loaded model and the scheduler that drives it (on the leader: and the other ranks)."""

    source: ModelSource
    max_model_len: int
    runner: ModelRunner
    scheduler: Scheduler
    followers: list[BaseProcess] = field(default_factory=list)

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (if this process started them) and leave."""
        try:
            self.scheduler.stop_followers()
        except RuntimeError as e:  # a rank already gone: nothing to tell it
            log.warning("could not stop the other tensor-parallel ranks cleanly: %s", e)
        for proc in self.followers:
            proc.join(FOLLOWER_JOIN_S)
            if proc.is_alive():
                log.warning("%s did not exit; killing it", proc.name)
                proc.kill()
        self.followers = []
        destroy_tp(self.runner.tp)


def rank_device(cfg: EngineConfig, rank: int) -> torch.device:
    """The device of tensor-parallel rank `rank`: cuda:rank with several ranks on CUDA."""
    device = resolve_device(cfg.device)
    if device.type == "cuda" and cfg.tp_size > 1:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    return device


def build_engine(cfg: EngineConfig, rank: int = 0, port: int | None = None) -> Engine:
    """Resolve the model, load this rank's shard of it and size the KV cache.

    With cfg.tp_size > 1 every rank calls this (rank 0 being the leader) with the same
    rendezvous `port` on 127.0.0.1; the other ranks then run `Scheduler.follow`.
    """
    source = resolve_model(cfg.model, cfg.dummy_weights, cfg.revision, cfg.progress and rank == 0)
    max_len = source.context_length(cfg.max_model_len)
    device = rank_device(cfg, rank)
    tp = TPGroup()
    if cfg.tp_size > 1:
        if port is None:
            raise ValueError("tensor parallelism needs a rendezvous port")
        tp = init_tp(rank, cfg.tp_size, port, device)
    runner = ModelRunner(cfg, source, max_len, tp, device)
    runner.allocate_kv()
    return Engine(source, max_len, runner, Scheduler(cfg, runner, max_len))


def run_follower(cfg: EngineConfig, rank: int, port: int) -> None:
    """Process entry of a non-leader rank: build its shard, follow the leader until it stops."""
    engine = build_engine(cfg, rank, port)
    engine.scheduler.follow()
    destroy_tp(engine.runner.tp)


def start_followers(cfg: EngineConfig, port: int, daemon: bool = True) -> list[BaseProcess]:
    """Start ranks 1..tp_size-1 as processes of their own (spawned: CUDA cannot fork)."""
    ctx = multiprocessing.get_context("spawn")
    procs: list[BaseProcess] = []
    for rank in range(1, cfg.tp_size):
        proc = ctx.Process(
            target=run_follower, args=(cfg, rank, port), name=f"tp-rank{rank}", daemon=daemon
        )
        proc.start()
        procs.append(proc)
    return procs


def launch_engine(cfg: EngineConfig) -> Engine:
    """The engine in this process as rank 0, with the other ranks started as child processes."""
    if cfg.tp_size == 1:
        return build_engine(cfg)
    source = resolve_model(cfg.model, cfg.dummy_weights, cfg.revision, cfg.progress)
    problem = source.config.tp_problem(cfg.tp_size)
    if problem is not None:
        raise ValueError(f"tp_size: {problem}")
    port = free_port()
    followers = start_followers(cfg, port)
    try:
        engine = build_engine(cfg, 0, port)
    except BaseException:
        for proc in followers:
            proc.kill()
        raise
    engine.followers = followers
    return engine
