"""Ranks and shards, for the sharded step paths (``sharded``) and the executors of ``muonkit.distributed``: which
rank owns which matrix (``assign_jobs``), agreeing on a flag (``any_rank``), DTensor shards (``is_sharded``,
``local``, ``shard_group``), the rows each rank holds of a ``Shard(0)`` placement (``shard_rows``) and moving those
rows (``gather_rows``, ``my_rows``). Bytes counted are what this rank sends under ring algorithms."""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["RankGroup", "any_rank", "assign_jobs", "gather_rows", "is_sharded", "local", "my_rows", "pack",
           "shard_group", "shard_rows", "start_row_gather", "unpack"]  # fmt: skip


class RankGroup(Protocol):
    """What the ZeRO-1 path reads of its executor (``muonkit.distributed.ReplicatedExecutor`` has it)."""

    group: Any  # the torch.distributed process group (None: the world)
    rank: int
    world_size: int


def assign_jobs(costs: list[float], world_size: int, load: list[float] | None = None) -> list[int]:
    """Owner rank of each job: longest job first to the least-loaded rank (ties to the lowest rank).

    ``load`` (one number per rank) is the work already assigned; it is updated in place.
    """
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    start = load if load is not None else [0.0] * world_size
    heap = [(start[r], r) for r in range(world_size)]
    heapq.heapify(heap)
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        total, rank = heapq.heappop(heap)
        owners[i] = rank
        heapq.heappush(heap, (total + costs[i], rank))
    if load is not None:
        for total, rank in heap:
            load[rank] = total
    return owners


def any_rank(flag: bool, group: dist.ProcessGroup | None = None) -> bool:
    """True on every rank of ``group`` if ``flag`` is True on any of them (one small all-reduce, one sync)."""
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def _views(flat: Tensor, tensors: Sequence[Tensor]) -> list[Tensor]:
    """Consecutive pieces of ``flat`` shaped like ``tensors``."""
    pieces = flat[: sum(t.numel() for t in tensors)].split([t.numel() for t in tensors])
    return [v.view(t.shape) for v, t in zip(pieces, tensors)]


def pack(tensors: Sequence[Tensor], flat: Tensor) -> None:
    """Copy ``tensors`` one after another into the start of ``flat`` (one multi-tensor copy)."""
    if tensors:
        torch._foreach_copy_(_views(flat, tensors), list(tensors))  # one multi-tensor copy (casts too)


def unpack(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    """The inverse of ``pack``: fill ``tensors`` from consecutive pieces of ``flat``."""
    if tensors:
        torch._foreach_copy_(list(tensors), _views(flat, tensors))


_DTensor: Any = None
try:
    from torch.distributed.tensor import DTensor

    _DTensor = DTensor
except ImportError:  # pragma: no cover - torch without DTensor
    pass


def is_sharded(t: Any) -> bool:
    """True for a DTensor (FSDP2 ``fully_shard`` parameters and their gradients are DTensors)."""
    return _DTensor is not None and isinstance(t, _DTensor)


def local(t: Any) -> Tensor:
    """The local shard of a DTensor (a view: in-place changes reach the DTensor); other tensors as they are."""
    if not is_sharded(t):
        return t
    # the DTensor's own local tensor: to_local() is an autograd function, measurable overhead per call
    return t._local_tensor if hasattr(t, "_local_tensor") else t.to_local()


def shard_rows(rows: int, world_size: int) -> list[int]:
    """Rows each rank holds of a dim-0 ``Shard(0)`` placement (torch.chunk: ceil-sized pieces, trailing ranks empty)."""
    chunk = -(-rows // world_size) if rows else 0
    return [max(0, min(chunk, rows - r * chunk)) for r in range(world_size)]


def shard_group(p: Any) -> tuple[dist.ProcessGroup | None, int, int]:
    """(process group, world size, rank) over which a DTensor's dim 0 is sharded; ``(None, 1, 0)`` if replicated.

    Supported placements: ``Shard(0)`` on one mesh dimension, ``Replicate()`` on any others (FSDP2, HSDP).
    """
    key = (id(p.device_mesh), tuple(p.placements))
    cached = _GROUPS.get(key)
    if cached is not None and cached[0] is p.device_mesh:  # the same live mesh, not a reused id
        return cached[1]
    from torch.distributed.tensor import Replicate, Shard

    sharded = [d for d, pl in enumerate(p.placements) if isinstance(pl, Shard)]
    others_ok = all(isinstance(pl, Replicate) for d, pl in enumerate(p.placements) if d not in sharded)
    if len(sharded) > 1 or not others_ok or (sharded and p.placements[sharded[0]].dim != 0):
        raise ValueError(
            f"Muon supports DTensor parameters sharded on dim 0 (FSDP2 fully_shard, Shard(0)) and replicated "
            f"elsewhere; got placements {tuple(p.placements)} for a parameter of shape {tuple(p.shape)}"
        )
    if not sharded:
        found: tuple[Any, int, int] = (None, 1, 0)
    else:
        group = p.device_mesh.get_group(sharded[0])
        found = (group, dist.get_world_size(group), dist.get_rank(group))
    if len(_GROUPS) >= _MAX_GROUPS:  # bounded: it holds the meshes it has seen alive
        _GROUPS.clear()
    _GROUPS[key] = (p.device_mesh, found)
    return found


_GROUPS: dict[tuple, tuple[Any, tuple[Any, int, int]]] = {}  # (mesh id, placements) -> (mesh, answer)
_MAX_GROUPS = 64


def start_row_gather(
    stack: Tensor, rows: int, executor: RankGroup, counter: list[int] | None = None
) -> Callable[[], Tensor]:
    """Start all-gathering every rank's ``shard_rows`` piece (dim 1 of ``stack``, ``(n, rows_me, *tail)``) of
    ``n`` tensors with ``rows`` rows; the returned function waits and gives ``(n, rows, *tail)``. Each rank sends
    the largest piece's row count (the first rank's), padded."""
    world = executor.world_size
    sizes = shard_rows(rows, world)
    send = stack
    if stack.shape[1] < sizes[0]:
        send = stack.new_zeros((stack.shape[0], sizes[0], *stack.shape[2:]))
        send[:, : stack.shape[1]] = stack
    flat = torch.empty(world * send.numel(), dtype=send.dtype, device=send.device)
    work = dist.all_gather_into_tensor(flat, send.reshape(-1), group=executor.group, async_op=True)
    if counter is not None:
        counter[0] += (world - 1) * send.numel() * send.element_size()

    def finish() -> Tensor:
        work.wait()
        recv = flat.view(world, *send.shape)
        return torch.cat([recv[r, :, : sizes[r]] for r in range(world)], dim=1)

    return finish


def gather_rows(rows: Tensor, shape: Sequence[int], executor: RankGroup) -> Tensor:
    """The whole tensor of ``shape`` from every rank's ``shard_rows`` piece (a collective: all ranks call it)."""
    return start_row_gather(rows.unsqueeze(0), int(shape[0]), executor)()[0]


def my_rows(full: Tensor, executor: RankGroup) -> Tensor:
    """This rank's ``shard_rows`` piece of ``full`` (a copy)."""
    sizes = shard_rows(full.shape[0], executor.world_size)
    start = sum(sizes[: executor.rank])
    return full[start : start + sizes[executor.rank]].clone()
