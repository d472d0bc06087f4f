"""Replicated parameters (DDP): ``ReplicatedExecutor`` spreads the batched NS jobs over the ranks.

After DDP averages the gradients every rank holds the same momentum. Each batched NS job goes to one rank (longest
job first to the least-loaded rank: the same deterministic plan on every rank); then ``all_gather`` hands every
rank all results (``exchange="all_reduce"``: the owners' outputs summed with zeros elsewhere, twice the bytes).
The exchange of one shape's results starts as soon as they are computed (asynchronously, so on NCCL it overlaps
the next shape's NS); shapes whose shares are too uneven for an all-gather wait and travel with the next. The
weights stay identical across ranks and equal to a single-process run with the same batching.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..optim.shards import any_rank, assign_jobs, pack, unpack
from ..optim.stages import Job

__all__ = ["EXCHANGES", "ReplicatedExecutor", "is_distributed"]

EXCHANGES = ("all_gather", "all_reduce")


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """True when a process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class ReplicatedExecutor:
    """Runs this rank's share of the jobs and exchanges the outputs (see the module docstring).

    Args:
        group: process group (default: the world).
        exchange: ``"all_gather"`` (default) or ``"all_reduce"``.
        comm_dtype: dtype the results travel in (``None``: the update buffers' dtype, exact). ``torch.bfloat16``
            halves the bytes at the price of rounding each update to bf16 (relative error <= 2^-9), so ranks
            still agree with each other but no longer bit-match a single-process run.
        overlap: exchange each shape's results as soon as they exist (default), or all at once at the end
            (one collective per dtype: fewer, larger messages).
        shard_state: ZeRO-1 style: each rank keeps only its rows of every Muon momentum buffer (1/W of the
            memory; see ``zero_muon_step``). ``Muon.state_dict()`` then gathers the buffers, so every rank
            must call it; ``load_state_dict`` keeps this rank's rows, whatever world size saved them.

    ``parts`` asks the step to cut each same-shape batch into ``world_size`` jobs so that a model with
    few distinct shapes still balances.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        exchange: str = "all_gather",
        comm_dtype: torch.dtype | None = None,
        overlap: bool = True,
        shard_state: bool = False,
    ):
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
        if comm_dtype is not None and not comm_dtype.is_floating_point:
            raise ValueError(f"comm_dtype must be a floating dtype or None, got {comm_dtype}")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "ReplicatedExecutor needs torch.distributed initialised (e.g. torchrun, or "
                "torch.distributed.init_process_group) before it is created"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.exchange = exchange
        self.comm_dtype = comm_dtype
        self.overlap = overlap
        self.shard_state = shard_state
        self.parts = self.world_size
        self.bytes_communicated = 0

    def __call__(self, jobs: list[Job]) -> None:
        owners = assign_jobs([j.cost for j in jobs], self.world_size)
        if self.world_size == 1:
            for j in jobs:
                j.run()
            return
        # One exchange per batch key (same-shape matrices), started as soon as this rank has computed its
        # part of it, so that on NCCL it overlaps the next key's NS. Every rank builds the same lists.
        rounds: dict[Any, list[int]] = defaultdict(list)
        for k, j in enumerate(jobs):
            rounds[j.key].append(k)
        pending, ready = [], []
        groups = list(rounds.values())
        for n, index in enumerate(groups):
            for k in index:
                if owners[k] == self.rank:
                    jobs[k].run()
            ready += index
            # an all-gather pads every rank to the largest share: wait for more rounds while that wastes > 25%
            share = [0] * self.world_size
            for k in ready:
                share[owners[k]] += sum(t.numel() for t in jobs[k].outputs)
            uneven = max(share) * self.world_size > 1.25 * sum(share)
            if n + 1 < len(groups) and (uneven or not self.overlap):
                continue
            by_kind: dict[tuple, list[list[Tensor]]] = defaultdict(lambda: [[] for _ in range(self.world_size)])
            for k in ready:
                for t in jobs[k].outputs:
                    by_kind[(t.dtype, t.device)][owners[k]].append(t)
            for (dtype, device), per_rank in by_kind.items():
                wire = self.comm_dtype or dtype
                start = self._all_reduce if self.exchange == "all_reduce" else self._all_gather
                pending.append(start(per_rank, wire, device))
            ready = []
        for finish in pending:
            finish()

    def _all_gather(self, per_rank: list[list[Tensor]], wire: torch.dtype, device: torch.device) -> Any:
        sizes = [sum(t.numel() for t in ts) for ts in per_rank]
        chunk = max(sizes)
        if chunk == 0:
            return lambda: None
        send = torch.zeros(chunk, dtype=wire, device=device)
        pack(per_rank[self.rank], send)
        recv = torch.empty(chunk * self.world_size, dtype=wire, device=device)
        work = dist.all_gather_into_tensor(recv, send, group=self.group, async_op=True)
        self.bytes_communicated += (self.world_size - 1) * chunk * send.element_size()

        def finish() -> None:
            work.wait()
            for r, ts in enumerate(per_rank):
                if ts and (r != self.rank or wire != ts[0].dtype):  # own results too when rounded for the wire
                    unpack(recv[r * chunk : (r + 1) * chunk], ts)

        return finish

    def _all_reduce(self, per_rank: list[list[Tensor]], wire: torch.dtype, device: torch.device) -> Any:
        tensors = [t for ts in per_rank for t in ts]
        flat = torch.zeros(sum(t.numel() for t in tensors), dtype=wire, device=device)
        before = sum(t.numel() for ts in per_rank[: self.rank] for t in ts)  # this rank's results sit here
        pack(per_rank[self.rank], flat[before:])
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self.bytes_communicated += int(2 * (self.world_size - 1) / self.world_size * flat.numel() * flat.element_size())

        def finish() -> None:
            work.wait()
            unpack(flat, tensors)

        return finish

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any rank (one small all-reduce)."""
        return any_rank(flag, self.group)
