"""Tensor parallelism on the CPU: two ranks (processes talking over gloo), each holding half of
the heads, half of the MLP features and half of the vocabulary, must compute what one does.

One rank is checked against HF transformers in test_parity.py; here two ranks are checked
against one on the same checkpoint: greedy tokens equal and logprobs within float32 noise (the
ranks' partial sums add up in another order), seeded sampling equal, and aborts / stop strings
replayed on both ranks so later requests still agree.
"""

from __future__ import annotations

import multiprocessing
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from minisgl import LLM
from minisgl.distributed.group import destroy_tp, init_tp
from minisgl.distributed.rendezvous import free_port
from minisgl.engine.cuda_graph import use_decode_graphs
from minisgl.sampling_params import SamplingParams
from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.engine_util import assert_idle
from tests.helpers.server_util import kill_mid_stream, pid_alive, run_server, wait_until

pytestmark = pytest.mark.slow

PROMPTS: list[Any] = [[5, 17, 300, 42, 9], [7] * 23, list(range(100, 161)), [1999, 3]]
OPTS: dict[str, Any] = {"progress": False, "page_size": 4, "chunked_prefill_size": 32}


def _checkpoint(tmp: Path, variant: str) -> Path:
    # An odd vocabulary: the second rank's embedding / LM-head shard has a padded tail.
    return make_checkpoint(tmp / variant, variant, seed=3, vocab_size=2047)


def _run(model: Path, tp: int) -> tuple[list[Any], list[Any]]:
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True, logprobs=True)
    seeded = [
        SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=10, ignore_eos=True, seed=s)
        for s in range(len(PROMPTS))
    ]
    with LLM(str(model), tp_size=tp, **OPTS) as llm:
        out = llm.generate(PROMPTS, greedy), llm.generate(PROMPTS, seeded)
        assert_idle(llm)
    return out


@pytest.mark.parametrize("variant", ["llama3-rope-tied", "qwen2-bias", "qwen3-qknorm"])
def test_two_ranks_compute_what_one_does(tmp_path: Path, variant: str) -> None:
    model = _checkpoint(tmp_path, variant)
    greedy1, seeded1 = _run(model, 1)
    greedy2, seeded2 = _run(model, 2)
    for a, b in zip(greedy1, greedy2, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert [o.token_ids for o in seeded1] == [o.token_ids for o in seeded2]


def test_calls_between_steps_keep_the_ranks_in_step(tmp_path: Path) -> None:
    """Every call that changes the leader's state reaches the other rank at the same point,
    and an unseeded request samples with the same (leader-drawn) seed on both ranks. A rank
    that fell out of step would cache other tokens, schedule differently and fail the collectives
    or the comparison."""
    model = _checkpoint(tmp_path, "llama3-rope-tied")
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    with LLM(str(model), **OPTS) as one:
        text = one.generate(PROMPTS[0], greedy)[0].text
    assert text is not None and len(text) >= 5
    with LLM(str(model), tp_size=2, **OPTS) as llm:
        # Aborted while streaming, and aborted while still queued.
        stream = llm.stream(PROMPTS[2], greedy)
        next(stream)
        stream.close()
        rid = llm.submit(PROMPTS[1], greedy)
        llm.abort(rid)
        # A stop string (matched by the leader's detokenizer, which aborts on every rank).
        stop = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True, stop=[text[2:5]])
        assert llm.generate(PROMPTS[0], stop)[0].finish_reason == "stop"
        # Sampling with a seed the leader draws; then a prompt that extends it (a cache hit).
        unseeded = SamplingParams(temperature=1.0, max_new_tokens=6, ignore_eos=True)
        sampled = llm.generate(PROMPTS[3], unseeded)[0].token_ids
        prompts = [*PROMPTS, PROMPTS[3] + sampled]
        got = [o.token_ids for o in llm.generate(prompts, greedy)]
        llm.scheduler.release_all_cache()
        assert_idle(llm)
    with LLM(str(model), **OPTS) as one:
        assert got == [o.token_ids for o in one.generate(prompts, greedy)]


def test_retraction_under_memory_pressure_on_two_ranks(tmp_path: Path) -> None:
    """A pool too small for the batch: requests are retracted and resumed the same way on
    both ranks (each rank's pool is half the size in bytes, the same in pages)."""
    model = _checkpoint(tmp_path, "qwen2-bias")
    greedy = SamplingParams(temperature=0.0, max_new_tokens=48, ignore_eos=True)
    prompts = [list(range(10 + i, 30 + 2 * i)) for i in range(8)]
    opts = {**OPTS, "page_size": 1, "num_pages": 110}
    outs = []
    for tp in (1, 2):
        with LLM(str(model), tp_size=tp, **opts) as llm:
            outs.append([o.token_ids for o in llm.generate(prompts, greedy)])
            assert llm.scheduler.stats().retractions > 0
            assert_idle(llm)
    assert outs[0] == outs[1]


def test_tensor_parallel_ranks_decode_without_cuda_graphs() -> None:
    """Until minisgl captures NCCL through a wrapper of its own (see use_decode_graphs)."""
    cuda = torch.device("cuda")
    assert use_decode_graphs(cuda, disabled=False, tp_size=1)
    assert not use_decode_graphs(cuda, disabled=False, tp_size=2)
    assert not use_decode_graphs(cuda, disabled=True, tp_size=1)
    assert not use_decode_graphs(torch.device("cpu"), disabled=False, tp_size=1)


def test_a_model_that_does_not_split_is_a_clear_error(tmp_path: Path) -> None:
    model = make_checkpoint(tmp_path / "m", "llama", seed=1)  # 2 key/value heads
    with pytest.raises(ValueError, match=r"key/value heads \(2\) is not divisible .* size 4"):
        LLM(str(model), tp_size=4, **OPTS)


def test_server_with_two_ranks(tmp_path: Path) -> None:
    model = _checkpoint(tmp_path, "qwen3-qknorm")
    with LLM(str(model), progress=False) as one:
        greedy = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
        expected = one.generate(PROMPTS[2], greedy)
    with run_server(tmp_path, "--model", str(model), "--tp-size", "2") as server:
        pids = server.worker_pids()
        assert set(pids) == {"tokenizer", "detokenizer", "scheduler", "scheduler_rank1"}
        with server.client() as client:
            got = client.generate(PROMPTS[2], max_new_tokens=8, temperature=0.0, ignore_eos=True)
        assert got.token_ids == expected[0].token_ids
        assert server.terminate() == 0
    wait_until(lambda: not any(pid_alive(p) for p in pids.values()), 20, "the ranks to exit")


def test_a_rank_that_dies_fails_the_server_cleanly(tmp_path: Path) -> None:
    """Like the scheduler dying: in-flight streams end with INTERNAL, health goes NOT_SERVING,
    every process exits."""
    with run_server(tmp_path, "--tp-size", "2", "--max-model-len", "512") as server:
        pids = server.worker_pids()
        kill_mid_stream(server, "scheduler_rank1", max_new_tokens=400, timeout=60)
        assert server.terminate(timeout=60) == 1
    wait_until(lambda: not any(pid_alive(p) for p in pids.values()), 20, "every process gone")


def _idle_rank(rank: int, port: int, results: Any) -> None:
    tp = init_tp(rank, 2, port, torch.device("cpu"), step_timeout=timedelta(seconds=2))
    if rank == 0:
        time.sleep(5)  # an idle server: no step for longer than a step's timeout
    got = tp.broadcast_object("next step" if rank == 0 else None)
    total = tp.all_reduce(torch.ones(3))
    results.put((rank, got, total.tolist()))
    destroy_tp(tp)


def test_the_other_ranks_outwait_an_idle_leader() -> None:
    """Rank 0's messages go over a group that never times out; a step's collectives do."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_idle_rank, args=(r, port, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        got = sorted(results.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert got == [(0, "next step", [2.0] * 3), (1, "next step", [2.0] * 3)]
    assert [p.exitcode for p in procs] == [0, 0]
