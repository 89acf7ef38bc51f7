"""Shared fixtures: tiny checkpoints on disk, built once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers.checkpoints import VARIANTS, make_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """variant name -> directory of a tiny random HF checkpoint."""
    root = tmp_path_factory.mktemp("ckpt")
    return {name: make_checkpoint(root / name, name, seed=i) for i, name in enumerate(VARIANTS)}


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add sync overhead (and thrash on a busy CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
