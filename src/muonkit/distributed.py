"""Sharding Muon's orthogonalization work across ranks (torch.distributed).

Replicated parameters (DDP): after the gradients are averaged every rank holds the same momentum, so
every rank could orthogonalize every matrix. Instead each batched NS job is given to one rank (greedy
longest-job-first by NS FLOPs, the same deterministic plan on every rank), the others zero its outputs,
and one ``all_reduce`` (sum) of the update buffers hands every rank all results. Adding zeros is exact, so
the weights stay identical across ranks and equal to a single-process run with the same batching.

The maths lives in ``muonkit.optim.functional``; this module only decides who computes what and moves
the results (as in microsoft/dion, communication kept apart from the math).
"""

from __future__ import annotations

import heapq
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import Tensor

from .optim.functional import Job

__all__ = ["ReplicatedExecutor", "assign_jobs", "is_distributed"]


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """True when a process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def assign_jobs(costs: list[float], world_size: int) -> list[int]:
    """Owner rank of each job: longest job first to the least-loaded rank (ties to the lowest rank)."""
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    load = [(0.0, r) for r in range(world_size)]
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        total, rank = heapq.heappop(load)
        owners[i] = rank
        heapq.heappush(load, (total + costs[i], rank))
    return owners


class ReplicatedExecutor:
    """Runs this rank's share of the jobs and all-reduces the outputs (see the module docstring).

    ``parts`` asks the step to cut each same-shape batch into ``world_size`` jobs so that a model with
    few distinct shapes still balances. ``bytes_communicated`` counts what this rank sent in all-reduces.
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "distributed='ddp' needs torch.distributed initialised (e.g. torchrun, or "
                "torch.distributed.init_process_group) before the first step"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.parts = self.world_size
        self.bytes_communicated = 0

    def __call__(self, jobs: list[Job]) -> None:
        owners = assign_jobs([j.cost for j in jobs], self.world_size)
        for j, owner in zip(jobs, owners):
            if owner == self.rank:
                j.run()
            else:
                for t in j.outputs:
                    t.zero_()
        if self.world_size == 1:
            return
        by_kind: dict[tuple, list[Tensor]] = defaultdict(list)
        for j in jobs:
            for t in j.outputs:
                by_kind[(t.dtype, t.device)].append(t)
        for tensors in by_kind.values():
            flat = torch.cat([t.reshape(-1) for t in tensors])
            dist.all_reduce(flat, group=self.group)
            self.bytes_communicated += flat.numel() * flat.element_size()
            offset = 0
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view(t.shape))
                offset += t.numel()

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any rank (one small all-reduce)."""
        device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())
