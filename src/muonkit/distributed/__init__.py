"""Spreading Muon's orthogonalization work across ranks (torch.distributed).

One rule for every layout: each matrix is orthogonalized whole, on exactly one rank, and the results are moved to
where they are needed. The maths lives in ``muonkit.optim``; this package decides who computes what and moves
tensors (as in microsoft/dion, communication kept apart from the math).

- Replicated parameters (DDP): ``ReplicatedExecutor`` (``replicated.py``), passed as ``Muon(executor=...)``;
  ``shard_state=True`` adds ZeRO-1 state sharding (``zero_muon_step``).
- Sharded parameters (FSDP2 ``fully_shard``, DTensor ``Shard(0)``): ``Muon`` takes them by itself through
  ``sharded_muon_step`` (``muonkit.optim.sharded``, re-exported here); no executor is needed.

Bytes counted in ``bytes_communicated`` are what this rank sends to other ranks under ring algorithms:
``2 (W-1)/W * size`` for an all-reduce, ``(W-1) * chunk`` for an all-gather, the off-rank segments of an
all-to-all.
"""

from ..optim.sharded import sharded_muon_step, zero_muon_step
from ..optim.shards import any_rank, assign_jobs, is_sharded, local, shard_rows
from .replicated import EXCHANGES, ReplicatedExecutor, is_distributed

__all__ = [
    "EXCHANGES",
    "ReplicatedExecutor",
    "any_rank",
    "assign_jobs",
    "is_distributed",
    "is_sharded",
    "local",
    "shard_rows",
    "sharded_muon_step",
    "zero_muon_step",
]
