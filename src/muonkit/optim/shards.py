"""Ranks and shards, for the sharded step paths (``sharded``) and the executors of ``muonkit.distributed``: which
rank owns which matrix (``assign_jobs``), agreeing on a flag (``any_rank``), DTensor shards (``is_sharded``,
``local``, and ``shard_layout``: which block of the global tensor each rank holds, for FSDP2, tensor parallel and
both), the rows each rank holds of a ``Shard(0)`` placement (``shard_rows``, ``row_blocks``) and moving those rows
(``gather_rows``, ``my_rows``). Bytes counted are what this rank sends under ring algorithms."""

from __future__ import annotations

import heapq
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Block", "Layout", "RankGroup", "any_rank", "assign_jobs", "gather_rows", "is_sharded", "local", "locals_of",
           "my_rows", "pack", "row_blocks", "shard_layout", "shard_rows", "start_row_gather", "unpack",
           "volume"]  # fmt: skip


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


def is_sharded(t: Any) -> bool:
    """True for a DTensor (FSDP2 ``fully_shard`` and tensor-parallel parameters and their gradients are DTensors).

    A DTensor can only exist once ``torch.distributed.tensor`` is imported, so this looks there instead of
    importing it (that import costs about a second at ``import muonkit``)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: Any) -> Tensor:
    """The local shard of a DTensor (a view: in-place changes reach the DTensor); other tensors as they are."""
    if not is_sharded(t):
        return t
    # the DTensor's own local tensor: to_local() is an autograd function, measurable overhead per call
    return t._local_tensor if hasattr(t, "_local_tensor") else t.to_local()


_PLAIN = (Tensor, torch.nn.Parameter)


def locals_of(tensors: Sequence[Any]) -> list[Tensor]:
    """``[local(t) for t in tensors]``, cheaper per tensor where they are plain tensors and parameters (every step's
    AdamW groups call it on four lists: 116 tensors of a GPT medium, 41 -> 7 us on a 2-core AMD EPYC)."""
    if sys.modules.get("torch.distributed.tensor") is None:
        return list(tensors)
    return [t if type(t) in _PLAIN else local(t) for t in tensors]


def shard_rows(rows: int, world_size: int) -> list[int]:
    """Rows each rank holds of a dim-0 ``Shard(0)`` placement (torch.chunk: ceil-sized pieces, trailing ranks empty)."""
    chunk = -(-rows // world_size) if rows else 0
    return [max(0, min(chunk, rows - r * chunk)) for r in range(world_size)]


Block = tuple[tuple[int, int], ...]  # a rank's piece of a tensor: (start, size) along each tensor dim


def row_blocks(shape: Sequence[int], world_size: int) -> tuple[Block, ...]:
    """Each rank's block of a tensor of ``shape`` split on dim 0 as ``shard_rows`` splits it."""
    sizes = shard_rows(int(shape[0]), world_size)
    tail = tuple((0, int(d)) for d in shape[1:])
    return tuple(((sum(sizes[:r]), n), *tail) for r, n in enumerate(sizes))


class Layout(NamedTuple):
    """How a DTensor's elements lie on the ranks that shard it: its exchange ``group`` (``None``: the world, or no
    exchange when ``world`` is 1), this rank's place in it, and every rank's ``Block`` of the global tensor."""

    group: Any
    world: int
    rank: int
    blocks: tuple[Block, ...]


def shard_layout(p: Any) -> Layout:
    """The ``Layout`` of DTensor ``p`` (a collective over its exchange group the first time a mesh, placements and
    shape are seen: every rank of the group must call it; cached after).

    Any ``Shard``/``Replicate`` placements on any mesh are supported where each rank's local tensor is one
    rectangular block of the global tensor (FSDP2 ``Shard(0)``, tensor-parallel ``Shard(0)``/``Shard(1)``, both on
    a 2-D mesh, HSDP): the exchange group spans the mesh dimensions that shard ``p``; ranks that differ only along
    replicated dimensions hold the same blocks and exchange among themselves.
    """
    key = (id(p.device_mesh), tuple(p.placements), tuple(p.shape))
    cached = _LAYOUTS.get(key)
    if cached is not None and cached[0] is p.device_mesh:  # the same live mesh, not a reused id
        return cached[1]
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape = tuple(int(d) for d in p.shape)
    placements = tuple(p.placements)
    sharded = [d for d, pl in enumerate(placements) if not isinstance(pl, Replicate)]
    # FSDP2 over tensor parallel writes _StridedShard (not a Shard subclass in every torch); the tiling check
    # below holds any placement to "one rectangular block per rank"
    if not all(isinstance(placements[d], Shard) or type(placements[d]).__name__ == "_StridedShard" for d in sharded):
        raise ValueError(
            f"Muon supports DTensor parameters with Shard and Replicate placements (not Partial); got {placements} "
            f"for a parameter of shape {shape}"
        )
    if not sharded:
        found = Layout(None, 1, 0, (tuple((0, d) for d in shape),))
    else:
        group = _mesh_group(p.device_mesh, sharded, placements)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        sizes, offsets = compute_local_shape_and_global_offset(shape, p.device_mesh, placements)
        device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        mine = torch.tensor([*offsets, *sizes], dtype=torch.int64, device=device)
        every = torch.empty(world * mine.numel(), dtype=torch.int64, device=device)
        dist.all_gather_into_tensor(every, mine, group=group)
        n = len(shape)
        rows = every.view(world, 2 * n).tolist()
        blocks = tuple(tuple(zip(row[:n], row[n:])) for row in rows)
        _check_tiling(blocks, shape, placements)
        found = Layout(group, world, rank, blocks)
    if len(_LAYOUTS) >= _MAX_LAYOUTS:  # bounded: it holds the meshes it has seen alive (cleared alike on every rank)
        _LAYOUTS.clear()
    _LAYOUTS[key] = (p.device_mesh, found)
    return found


_LAYOUTS: dict[tuple, tuple[Any, Layout]] = {}  # (mesh id, placements, shape) -> (mesh, layout)
_MAX_LAYOUTS = 256


def _mesh_group(mesh: Any, dims: list[int], placements: tuple) -> Any:
    """The process group spanning mesh dimensions ``dims`` (this rank's coordinates fixed along the others)."""
    if len(dims) == 1:
        return mesh.get_group(dims[0])
    if len(dims) == mesh.ndim and mesh.size() == dist.get_world_size():
        return None  # the whole world (group ranks are global ranks; the blocks are gathered in that order)
    names = mesh.mesh_dim_names
    if names is not None:
        sub = mesh[tuple(names[d] for d in dims)]
        if hasattr(sub, "_flatten"):
            return sub._flatten().get_group()
    raise ValueError(
        f"a DTensor sharded along mesh dimensions {dims} of a {tuple(mesh.shape)} mesh (placements {placements}) "
        f"needs a process group spanning them: name the mesh dimensions (init_device_mesh(..., mesh_dim_names=...)) "
        f"on a torch whose DeviceMesh has _flatten, or use a mesh that covers the world"
    )


def _check_tiling(blocks: tuple[Block, ...], shape: tuple[int, ...], placements: tuple) -> None:
    """Every element of the global tensor in exactly one rank's block, else a ``ValueError``."""
    volumes = [volume(b) for b in blocks]
    overlap = any(
        volumes[a]
        and volumes[b]
        and all(sa < sb + nb and sb < sa + na for (sa, na), (sb, nb) in zip(blocks[a], blocks[b]))
        for a in range(len(blocks))
        for b in range(a + 1, len(blocks))
    )
    if overlap or sum(volumes) != volume(tuple((0, d) for d in shape)):
        raise ValueError(
            f"the local tensors of a DTensor of shape {shape} with placements {placements} are not one rectangular "
            f"block of it per rank (blocks {blocks}); Muon cannot reassemble its matrices"
        )


def volume(block: Block) -> int:
    """How many elements ``block`` holds."""
    n = 1
    for _, size in block:
        n *= size
    return n


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
