"""The leader-to-follower protocol of tensor parallelism, as typed msgspec structs.

The leader (rank 0) records every call that changes its scheduler's state and, at the start of
each step, broadcasts them with a fingerprint of its state; the other ranks replay them, check
the fingerprint and step too. Scheduling is deterministic given those calls and the sampled
tokens, so no other message is needed.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from minisgl.distributed.group import TPGroup
from minisgl.sampling_params import SamplingParams


class AddOp(msgspec.Struct, tag=True, frozen=True):
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int


class AbortOp(msgspec.Struct, tag=True, frozen=True):
    rid: str


class ReleaseCacheOp(msgspec.Struct, tag=True, frozen=True):
    pass


class StopOp(msgspec.Struct, tag=True, frozen=True):
    pass


Op = AddOp | AbortOp | ReleaseCacheOp | StopOp


class Fingerprint(msgspec.Struct, frozen=True):
    """What every rank must agree on before a step (tokens: a hash of all read back)."""

    steps: int
    waiting: int
    running: int
    free_pages: int
    token_digest: int


class StepSync(msgspec.Struct, frozen=True):
    """Sent by the leader at the start of each step."""

    ops: list[Op]
    fingerprint: Fingerprint


class Replica(Protocol):
    """The scheduler calls a follower replays."""

    def add_request(
        self, rid: str, prompt_ids: list[int], params: SamplingParams, seed: int | None = None
    ) -> None: ...

    def abort(self, rid: str) -> bool: ...

    def release_all_cache(self) -> None: ...

    def fingerprint(self) -> Fingerprint: ...

    def step(self) -> object: ...


_DECODER = msgspec.msgpack.Decoder(StepSync)


class TPSync:
    """The leader's record of calls not yet sent; the followers' replay loop."""

    def __init__(self, tp: TPGroup) -> None:
        self.tp = tp
        self._ops: list[Op] = []

    @property
    def leads_others(self) -> bool:
        """This is rank 0 of several: other ranks replay its calls."""
        return self.tp.size > 1 and self.tp.is_leader

    def record(self, op: Op) -> None:
        """Leader: remember a state-changing call for the other ranks (sent with the next step)."""
        if self.leads_others:
            self._ops.append(op)

    def send(self, fingerprint: Fingerprint) -> None:
        """Leader, at the start of a step: the calls recorded since the last one."""
        if self.leads_others:
            self.tp.broadcast_object(msgspec.msgpack.encode(StepSync(self._ops, fingerprint)))
            self._ops = []

    def stop_followers(self, fingerprint: Fingerprint) -> None:
        """Leader: let the other ranks' `follow` return (the engine is shutting down)."""
        if self.leads_others:
            self.tp.broadcast_object(msgspec.msgpack.encode(StepSync([StopOp()], fingerprint)))

    def follow(self, replica: Replica) -> None:
        """Other ranks: replay the leader's calls and step with it, until it says stop."""
        assert not self.tp.is_leader
        while True:
            sync = _DECODER.decode(self.tp.broadcast_object(None))
            for op in sync.ops:
                if isinstance(op, StopOp):
                    return
                if isinstance(op, AddOp):
                    replica.add_request(op.rid, op.prompt_ids, op.params, op.seed)
                elif isinstance(op, AbortOp):
                    replica.abort(op.rid)
                else:
                    replica.release_all_cache()
            mine = replica.fingerprint()
            if mine != sync.fingerprint:  # a bug: fail loudly rather than compute garbage
                raise RuntimeError(
                    f"tensor-parallel rank {self.tp.rank} is out of step with rank 0: "
                    f"{mine} != {sync.fingerprint}"
                )
            replica.step()
