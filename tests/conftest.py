"""Shared fixtures: tiny checkpoints on disk, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.checkpoints import VARIANTS, make_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """variant name -> directory of a tiny random HF checkpoint."""
    root = tmp_path_factory.mktemp("ckpt")
    return {name: make_checkpoint(root / name, name, seed=i) for i, name in enumerate(VARIANTS)}
