"""Sparse mixture-of-experts feed-forward (Qwen3-MoE, Mixtral): a router picks the top-k of E
SwiGLU experts per token and the block returns their outputs weighted by the routing weights.

Each projection's experts are stacked into one weight: gate_up_proj [E, 2I, H] (every expert's
gate rows then its up rows) and down_proj [E, H, I]. With tensor parallelism every rank holds
all the experts, each with 1/tp of the intermediate features (as the dense MLP is split), and
the partial outputs are summed over the ranks. On CUDA the block runs the fused Triton kernel
(minisgl.kernels.fused_moe); elsewhere the torch path below, one expert at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minisgl.distributed.group import TPGroup
from minisgl.kernels import fused_moe
from minisgl.layers.linear import MergedLinear

#: The checkpoint's per-expert projections -> (our stacked weight, part index in it).
EXPERT_PROJECTIONS = {
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights float32 [T, k], expert ids int64 [T, k]): the softmax over all experts' logits,
    its top k, divided by their sum when `renormalize` (then equal to a softmax over the top-k
    logits, as Mixtral defines it). Of equal probabilities the lower expert index comes first,
    as in the fused kernel (bfloat16 logits tie often)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    weights, ids = weights[..., :top_k], ids[..., :top_k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def experts_torch(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    dense: bool = False,
) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) for x [T, H]: a loop over the experts,
    each applied to the tokens routed to it (the reference the fused kernel is tested against).

    `dense`: each expert over every token, weighted by 0 where not routed there: E / k times
    the work, but no data-dependent shape or host sync (what a CUDA graph capture needs).
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(gate_up.shape[0]):
        if dense:
            out += _expert(x, gate_up[e], down[e]) * (weights * (ids == e)).sum(-1, keepdim=True)
            continue
        rows, slots = (ids == e).nonzero(as_tuple=True)
        if rows.numel():
            y = _expert(x[rows], gate_up[e], down[e])
            out.index_add_(0, rows, y * weights[rows, slots, None])
    return out.to(x.dtype)


def _expert(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert, float32 out: down(silu(gate) * up)."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down).float()


class Experts(nn.Module):
    """E SwiGLU experts, stacked: gate_up_proj [E, 2I/tp, H], down_proj [E, H, I/tp]."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.num_experts = num_experts
        self.inter = tp.shard(intermediate, "moe_intermediate_size")
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * self.inter, hidden), requires_grad=False
        )
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden, self.inter), requires_grad=False
        )

    def checkpoint_slice(self, full: torch.Tensor, projection: str) -> torch.Tensor:
        """This rank's piece of one expert's checkpoint matrix (gate/up [I, H], down [H, I])."""
        n, r = self.inter, self.tp.rank
        dim = 1 if projection == "down_proj" else 0
        if full.dim() == 2 and full.shape[dim] == n * self.tp.size:
            return full.narrow(dim, r * n, n)
        return full

    def target(self, expert: int, projection: str) -> torch.Tensor:
        """The view of the stacked weights that expert `expert`'s `projection` fills."""
        ours, part = EXPERT_PROJECTIONS[projection]
        if ours == "down_proj":
            return self.down_proj.data[expert]
        return self.gate_up_proj.data[expert, part * self.inter : (part + 1) * self.inter]


class SparseMoE(nn.Module):
    """Router (`gate`, replicated on every rank) and experts; returns [T, H] like the MLP. The
    fused Triton MoE runs on the GPU unless `fused` is False."""

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        tp: TPGroup,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.fused = fused
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = MergedLinear(hidden, [num_experts], False)
        self.experts = Experts(num_experts, hidden, intermediate, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        w13, w2 = self.experts.gate_up_proj, self.experts.down_proj
        out = fused_moe(x, logits, w13, w2, self.top_k, self.renormalize) if self.fused else None
        if out is None:
            weights, ids = select_experts(logits, self.top_k, self.renormalize)
            capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
            out = experts_torch(x, weights, ids, w13, w2, dense=capturing)
        return self.tp.all_reduce(out)
