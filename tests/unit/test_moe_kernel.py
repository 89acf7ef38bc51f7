"""The fused Triton MoE (minisgl/kernels/moe.py) against the torch path, on the CPU through the
Triton interpreter, float32 and float16, tiny shapes: even and ragged expert loads, experts
that get no token, both tile configurations, with and without renormalisation."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from types import ModuleType

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from minisgl.layers.moe import SparseMoE, experts_torch, select_experts


@pytest.fixture(scope="module")
def k() -> Iterator[ModuleType]:
    os.environ["TRITON_INTERPRET"] = "1"
    from minisgl.kernels import moe

    if type(moe._route_kernel).__name__ != "InterpretedFunction":
        moe = importlib.reload(moe)
    yield moe


def _case(
    tokens: int, experts: int, hidden: int, inter: int, load: str, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    logits = torch.randn(tokens, experts, generator=gen)
    if load == "ragged":
        # Most tokens prefer expert 1, some expert 2; the last three experts get no token.
        logits[:, 1] += 4.0
        logits[: tokens // 3, 2] += 4.0
        logits[:, experts - 3 :] -= 30.0
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(dtype)
    down = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).to(dtype)
    return x, logits, gate_up, down  # float32 logits: no ties for the two paths to break


def _reference(
    x: torch.Tensor, logits: torch.Tensor, *w: torch.Tensor, top_k: int, norm: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    weights, ids = select_experts(logits, top_k, norm)
    return experts_torch(x.float(), weights, ids, *(t.float() for t in w)), weights, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "norm", "load", "hidden", "inter"),
    [
        (1, 8, 2, True, "even", 48, 24),  # one decode token
        (7, 8, 2, False, "even", 48, 24),
        (23, 8, 2, True, "ragged", 48, 24),  # blocks of 16 padded; experts 5-7 empty
        (40, 4, 1, False, "ragged", 48, 24),  # 40 pairs > 4 * E: the prefill tiles (blocks of 64)
        (9, 8, 2, True, "ragged", 128, 128),  # both reductions a multiple of the K tile (128)
        (40, 4, 1, True, "even", 64, 64),  # the same with the prefill tiles (64)
        (2, 8, 2, False, "even", 256, 256),
    ],
)
def test_fused_moe_matches_the_torch_path(
    k: ModuleType,
    dtype: torch.dtype,
    tokens: int,
    experts: int,
    top_k: int,
    norm: bool,
    load: str,
    hidden: int,
    inter: int,
) -> None:
    x, logits, gate_up, down = _case(tokens, experts, hidden, inter, load, dtype, seed=tokens)
    ref, _, ids = _reference(x, logits, gate_up, down, top_k=top_k, norm=norm)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    got = k.fused_moe(x, logits, gate_up, down, top_k, norm)
    assert got.shape == x.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol)
    if load == "ragged":
        assert not torch.isin(ids, torch.arange(experts - 3, experts)).any()


@pytest.mark.parametrize("block_m", [4, 16])
def test_routing_sorts_every_pair_once_into_padded_expert_runs(k: ModuleType, block_m: int) -> None:
    tokens, experts, top_k = 19, 8, 3
    _, logits, _, _ = _case(tokens, experts, 8, 8, "ragged", torch.float32, seed=5)
    r = k.route(logits, top_k, True, block_m)
    weights, ids = select_experts(logits, top_k, True)
    # The same experts and weights as torch (order within a token may differ).
    order = r.ids.long().argsort(dim=-1)
    assert torch.equal(r.ids.long().gather(1, order), ids.sort(dim=-1).values)
    theirs = weights.gather(1, ids.argsort(dim=-1))
    torch.testing.assert_close(r.weights.gather(1, order), theirs, atol=1e-6, rtol=1e-6)
    pairs = tokens * top_k
    counts = torch.bincount(ids.flatten(), minlength=experts)
    padded = (counts + block_m - 1) // block_m * block_m
    used = int(r.num_padded.item())
    assert used == int(padded.sum())
    assert r.sorted_pairs.numel() >= used and r.sorted_pairs.numel() % block_m == 0
    slots = r.sorted_pairs[:used].long()
    real = slots[slots < pairs]
    assert sorted(real.tolist()) == list(range(pairs)), "each pair exactly once"
    assert int((slots == pairs).sum()) == used - pairs, "the rest is padding"
    flat = r.ids.flatten().long()
    start = 0
    for e in range(experts):
        run = slots[start : start + int(padded[e])]
        assert all(flat[p] == e for p in run[run < pairs].tolist()), f"expert {e}'s run"
        assert int((run < pairs).sum()) == int(counts[e])
        blocks = r.block_expert[start // block_m : (start + int(padded[e])) // block_m]
        assert (blocks == e).all()
        start += int(padded[e])


def test_no_tokens_is_an_empty_result(k: ModuleType) -> None:
    x, logits, gate_up, down = _case(0, 4, 16, 8, "even", torch.float32, seed=0)
    assert k.fused_moe(x, logits, gate_up, down, 2, True).shape == (0, 16)


def test_the_layer_takes_the_kernel_only_on_the_gpu_path(
    k: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SparseMoE runs the torch path for a CPU tensor, the kernel once the GPU gate is open
    (forced here: the interpreter runs it on the CPU); both give the same output."""
    import minisgl.kernels as ops
    from minisgl.distributed.group import TPGroup

    calls: list[int] = []
    real = k.fused_moe

    def counted(*args: object) -> object:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(k, "fused_moe", counted)
    layer = SparseMoE(32, 16, 6, 2, True, TPGroup())
    gen = torch.Generator().manual_seed(1)
    for p in layer.parameters():
        p.data.normal_(0.0, 0.2, generator=gen)
    x = torch.randn(5, 32, generator=gen)
    torch_path = layer(x)
    assert calls == []
    monkeypatch.setattr(ops, "_on_gpu", lambda t: True)
    fused_path = layer(x)
    assert calls == [1]
    torch.testing.assert_close(fused_path, torch_path, atol=1e-5, rtol=1e-5)
    assert ops.fused_moe(x[None], x, x, x, 2, True) is None  # 3-D input: the torch path
    unfused = SparseMoE(32, 16, 6, 2, True, TPGroup(), fused=False)
    unfused.load_state_dict(layer.state_dict())
    torch.testing.assert_close(unfused(x), torch_path)
    assert calls == [1], "fused=False took the kernel path"


@pytest.mark.parametrize("config", [(16, 16, 64, 4, 3), (16, 64, 256, 4, 4), (64, 32, 128, 8, 3)])
def test_each_tile_config_matches_the_torch_path(
    k: ModuleType, config: tuple[int, int, int, int, int]
) -> None:
    """Tile configurations other than the defaults (`moe_grouped(..., config)`)."""
    x, logits, gate_up, down = _case(9, 8, 128, 96, "ragged", torch.float32, seed=5)
    ref, _, _ = _reference(x, logits, gate_up, down, top_k=2, norm=True)
    got = k.moe_grouped(x, logits, gate_up, down, 2, True, k.TileConfig(*config))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("load", ["even", "ragged"])
def test_the_dense_torch_loop_equals_the_routed_one(load: str) -> None:
    """The graph-safe torch form (every expert over every token, zero weight where unrouted)
    gives the routed loop's result."""
    x, logits, gate_up, down = _case(13, 8, 32, 16, load, torch.float32, seed=2)
    weights, ids = select_experts(logits, 3, False)
    routed = experts_torch(x, weights, ids, gate_up, down)
    dense = experts_torch(x, weights, ids, gate_up, down, dense=True)
    torch.testing.assert_close(dense, routed, atol=1e-6, rtol=1e-5)
    assert routed.abs().max() > 0.1


def test_tied_logits_pick_the_same_experts_in_both_paths(k: ModuleType) -> None:
    """Bfloat16 router logits tie often; both paths take the lower expert index first, so
    they route a tie the same way (in the same order)."""
    logits = torch.tensor(
        [
            [1.0, 3.0, 3.0, 0.0, 3.0, -1.0],
            [2.0, 2.0, 2.0, 2.0, 2.0, 2.0],
            [0.0, 0.0, 5.0, 0.0, 0.0, 5.0],
        ]
    )
    for top_k in (1, 2, 3):
        weights, ids = select_experts(logits, top_k, True)
        r = k.route(logits, top_k, True, block_m=4)
        assert r.ids.long().tolist() == ids.tolist()
        torch.testing.assert_close(r.weights, weights)
    assert select_experts(logits, 2, False)[1].tolist() == [[1, 2], [0, 1], [2, 5]]
