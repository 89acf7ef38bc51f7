"""Tensor parallelism: the process group of one engine's ranks and the collectives it uses.

Every rank is a process with its own model shard and KV-cache shard. Collectives on tensors run
on the device group (NCCL on GPUs, gloo on CPU); the scheduler's per-step messages (Python
objects) go over a gloo group on the CPU. A single-rank group does nothing and needs no
torch.distributed at all, so the default path has no distributed state.
"""
