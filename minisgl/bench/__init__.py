"""Benchmarks: offline workloads, the online gRPC harness, profiling helpers."""

from __future__ import annotations

import json
from typing import Any


def report(result: dict[str, Any], path: str | None) -> None:
    """Print a result as JSON, and write it to `path` when given."""
    print(json.dumps(result, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
