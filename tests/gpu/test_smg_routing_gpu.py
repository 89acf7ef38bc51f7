"""smg in front of two minisgl replicas sharing one GPU (qwen3-0.6b, dummy weights,
--mem-fraction 0.45 each): a W6-like shared-prefix workload (16 groups x 8 prompts, a
~2,000-token prefix each, 64 new tokens, 32 in flight) through smg's cache_aware policy (fed
by the replicas' KV events) and through round_robin. Prints hit rate and throughput of both
(the measurement for benchmarks/RESULTS.md) and checks that cache_aware keeps each group on
one replica. The demo tokenizer encodes the text (the preset has none of its own)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers.server_util import Server
from tests.helpers.smg_util import (
    flush,
    run_replicas,
    run_smg,
    run_workload,
    shared_prefix_prompts,
)

pytestmark = pytest.mark.gpu

MODEL = "qwen3-0.6b"
REPLICA_FLAGS = (
    *("--model", MODEL, "--dummy-weights", "--device", "cuda", "--mem-fraction", "0.45"),
    *("--max-running-requests", "64"),
)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    assert torch.cuda.is_available(), "the gpu tests need a CUDA GPU"
    with run_replicas(tmp_path_factory.mktemp("smg-gpu"), 2, *REPLICA_FLAGS) as servers:
        for s in servers:
            s.wait_serving(timeout=600)
        yield servers


def test_cache_aware_vs_round_robin_on_a_gpu(tmp_path: Path, replicas: list[Server]) -> None:
    prompts = shared_prefix_prompts(groups=16, per_group=8, words=800, seed=1)
    results = {}
    for policy in ("cache_aware", "round_robin"):
        with run_smg(tmp_path, replicas, "--policy", policy) as gw:
            run_workload(gw.base_url, MODEL, prompts[:4], 4, 4)  # warm the path
            for r in replicas:
                flush(r)
            results[policy] = run_workload(gw.base_url, MODEL, prompts, 64, 32)
            print("\n" + results[policy].line(f"smg {policy}, 2 replicas, {MODEL}"))
    ca, rr = results["cache_aware"], results["round_robin"]
    per_group = 8
    best = (per_group - 1) / per_group  # each group's first prompt misses
    assert ca.hit_rate >= 0.8 * best, ca.line("cache_aware")
    assert rr.hit_rate < ca.hit_rate, (rr.line("round_robin"), ca.line("cache_aware"))
