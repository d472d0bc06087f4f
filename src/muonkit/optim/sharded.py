"""Muon's step paths for parameters or state sharded across ranks, which ``Muon`` takes by itself.

*Sharded parameters (DTensors: FSDP2 ``fully_shard``, tensor parallel, both on a 2-D mesh)* - ``sharded_muon_step``.
Momentum is kept and updated on the local shards (so the optimizer state is sharded like the parameters). Each
parameter gets an owner rank (FLOP-balanced) among the ranks that shard it; one ``all_to_all`` per bucket (same
global shape and layout) sends every rank's block of that bucket's updates to their owners, which assemble whole
matrices and orthogonalize them in batched calls; a second ``all_to_all`` sends each rank its block of the result.
Every element crosses the network once each way, so the update is single-process Muon's whatever the placements
(a tensor-parallel shard is never orthogonalized on its own). The exchange of the next bucket is in flight while
a bucket's NS runs. Results are written in the NS dtype and scaled on arrival exactly as a single process scales
them, so bf16 NS means bf16 traffic back and identical weights.

*Sharded state (ZeRO-1)* - ``zero_muon_step``: replicated parameters, each rank keeping only its rows of every
momentum buffer (``muonkit.distributed.ReplicatedExecutor(shard_state=True)``).

These live in the optimizer layer because ``Muon`` dispatches DTensor parameters to them with no executor from
the user; ``muonkit.distributed`` (the layer above) holds what a user builds to spread replicated work, and
re-exports the public names here and of ``shards``. Bytes counted are what this rank sends under ring algorithms.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..newton_schulz import default_ns_dtype
from .options import DEFAULTS, NS_OPTIONS, STEP_OPTIONS
from .parts import matrix_parts
from .pipeline import get_stage
from .shards import (
    Block,
    RankGroup,
    assign_jobs,
    locals_of,
    row_blocks,
    shard_layout,
    shard_rows,
    unpack,
    volume,
)
from .stages import lr_scale, momentum_update, ns_flops, ns_jobs, run_all

__all__ = ["sharded_muon_step", "zero_muon_step"]


class _Bucket:
    """Parameters of one global shape, dtype and layout (``Block`` per rank), exchanged and orthogonalized together.

    ``order`` lists the bucket's parameters sorted by owner rank, so that every buffer below is one
    stacked tensor: rank r's blocks of all the bucket's updates are ``(n, *size_r)`` with the parameters
    owned by rank 0 first, and the owner's whole matrices are ``(n_mine, *shape)``.
    """

    def __init__(self, shape: tuple[int, ...], blocks: tuple[Block, ...], index: list[int], owners: list[int]):
        self.shape = shape
        self.sizes = [tuple(n for _, n in b) for b in blocks]  # each rank's block shape
        self.numel = [volume(b) for b in blocks]
        self.where = [(slice(None), *(slice(s, s + n) for s, n in b)) for b in blocks]  # in (n, *shape)
        pairs = sorted(zip(owners, index))  # stable by owner, then by position
        self.order = [i for _, i in pairs]
        self.count = [sum(1 for o, _ in pairs if o == r) for r in range(len(blocks))]
        self.recv: Tensor | None = None
        self.work: Any = None
        self.out_recv: Tensor | None = None
        self.out_work: Any = None
        self.uniform, self.scale = True, 1.0  # one lr scale for all parts, and which (set in step 2)

    def owned(self, rank: int) -> list[int]:
        """The bucket's parameters whose owner is ``rank``, in ``order``."""
        first = sum(self.count[:rank])
        return self.order[first : first + self.count[rank]]


def sharded_muon_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    comm_dtype: torch.dtype | None = None,
    stats: dict[str, list[Tensor]] | None = None,
    counter: list[int] | None = None,
    stage_states: Sequence[Tensor] | None = None,
    **options: Any,
) -> None:
    """One Muon step for DTensor parameters (see the module docstring; placements as ``shards.shard_layout``). In place.
    ``stage_states``: a ``rows_state`` postscale stage's state per parameter, whole on every rank (one number
    per matrix row: small); the owner updates it and every rank receives the result (``_ShardedExchange``).

    ``comm_dtype`` (``None``: exact) is the dtype updates travel in to their owners; results travel back
    in the NS dtype when all of a parameter's parts share one lr scale (exact), else in the update dtype.
    ``counter[0]`` is increased by the bytes this rank sends. ``options``: ``muon_step``'s options (``lr``,
    ``momentum``, ``nesterov``, ``weight_decay`` and ``adjust_lr`` required; the rest default as there).
    """
    opts, ns = _step_options(options, "sharded_muon_step")
    if not params:
        return
    lr, adjust_lr = opts["lr"], opts["adjust_lr"]
    local_params = locals_of(params)
    updates = momentum_update(locals_of(grads), locals_of(momentum_buffers), opts["momentum"], opts["nesterov"])
    by_group: dict[tuple[Any, int], list[int]] = defaultdict(list)  # (group, its size): None is the world or none
    layouts = [shard_layout(p) for p in params]
    for i, layout in enumerate(layouts):
        by_group[layout.group, layout.world].append(i)
    new_updates: list[Tensor | None] = [None] * len(params)
    for (group, _), index in by_group.items():
        world, rank = layouts[index[0]].world, layouts[index[0]].rank
        states = None if stage_states is None else [stage_states[i] for i in index]
        if world == 1:  # replicated DTensors: the local tensor is the whole matrix
            outs = [torch.empty_like(updates[i]) for i in index]
            ups = [updates[i] for i in index]
            run_all(ns_jobs(ups, outs, lr=lr, adjust_lr=adjust_lr, ns=ns, stats=stats, states=states))
            for i, o in zip(index, outs):
                new_updates[i] = o
            continue
        exchange = _ShardedExchange(group, world, rank, comm_dtype, counter)
        results = exchange.run([params[i] for i in index], [layouts[i].blocks for i in index],
                               [updates[i] for i in index], lr, adjust_lr, ns, stats, states)  # fmt: skip
        for i, o in zip(index, results):
            new_updates[i] = o
    assert all(u is not None for u in new_updates)
    get_stage("update", opts["update"]).fast(local_params, new_updates, lr, opts["weight_decay"])


def zero_muon_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    row_buffers: Sequence[Tensor],
    *,
    executor: RankGroup,
    comm_dtype: torch.dtype | None = None,
    stats: dict[str, list[Tensor]] | None = None,
    counter: list[int] | None = None,
    stage_states: Sequence[Tensor] | None = None,
    **options: Any,
) -> None:
    """Muon for replicated (DDP) parameters with ZeRO-1 style momentum: this rank keeps only its
    ``shard_rows`` of each momentum buffer (``row_buffers``).

    Momentum runs on this rank's rows of the (already averaged) gradient; the rows go to the matrices'
    owners as in the FSDP2 path (one ``all_to_all`` per same-shape bucket, NS there), then a second
    ``all_to_all`` per bucket sends each owner's whole results to every rank (an all-gather of uneven shares,
    without padding). Per rank that sends its rows of the matrices others own, and each result it owns to the
    W-1 other ranks: about ``1 + 1/W`` times the replicated exchange's bytes, on a balanced plan. The result
    equals single-process Muon; the state takes 1/W of the memory. ``options`` and ``stage_states`` as for
    ``sharded_muon_step``.
    """
    opts, ns = _step_options(options, "zero_muon_step")
    if not params:
        return
    world, rank = executor.world_size, executor.rank
    row_grads = []
    for p, g, b in zip(params, grads, row_buffers):
        rows = shard_rows(p.shape[0], world)
        if tuple(b.shape) != (rows[rank], *p.shape[1:]):
            raise ValueError(
                f"momentum buffer of shape {tuple(b.shape)} does not hold rank {rank}'s {rows[rank]} rows of a "
                f"{tuple(p.shape)} parameter (state loaded for another world size without load_state_dict?)"
            )
        start = sum(rows[:rank])
        row_grads.append(g[start : start + rows[rank]])
    updates = momentum_update(row_grads, row_buffers, opts["momentum"], opts["nesterov"])
    exchange = _ShardedExchange(executor.group, world, rank, comm_dtype, counter)
    blocks = [row_blocks(p.shape, world) for p in params]
    full_updates = exchange.run(params, blocks, updates, opts["lr"], opts["adjust_lr"], ns, stats, stage_states,
                                whole=True)  # fmt: skip
    get_stage("update", opts["update"]).fast(params, full_updates, opts["lr"], opts["weight_decay"])


_REQUIRED = ("lr", "momentum", "nesterov", "weight_decay", "adjust_lr")  # keyword-only without default in muon_step


def _step_options(options: dict[str, Any], who: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` of a sharded step checked against ``muon_step``'s (``TypeError`` naming missing or unexpected
    ones, as Python does for a signature), completed with the defaults; and the orthogonalization's part."""
    missing = [k for k in _REQUIRED if k not in options]
    unknown = sorted(set(options) - set(STEP_OPTIONS))
    if missing or unknown:
        raise TypeError(f"{who} got unexpected options {unknown} or lacks {missing}")
    opts = {**DEFAULTS, **options}
    return opts, {k: opts[k] for k in NS_OPTIONS}


class _ShardedExchange:
    """The two all-to-alls of one process group, pipelined over same-shape buckets."""

    def __init__(self, group: Any, world: int, rank: int, comm_dtype: torch.dtype | None, counter: list[int] | None):
        self.group, self.world, self.rank = group, world, rank
        self.comm_dtype = comm_dtype
        self.counter = counter

    def _a2a(self, send: Tensor, send_splits: list[int], recv_splits: list[int]) -> tuple[Tensor, Any]:
        recv = torch.empty(sum(recv_splits), dtype=send.dtype, device=send.device)
        work = dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group, async_op=True)
        if self.counter is not None:
            self.counter[0] += (sum(send_splits) - send_splits[self.rank]) * send.element_size()
        return recv, work

    def run_stacked(
        self,
        params: Sequence[Tensor],
        blocks: Sequence[tuple[Block, ...]],
        updates: Sequence[Tensor],
        lr: float,
        adjust_lr: Any,
        ns: dict[str, Any],
        stats: dict[str, list[Tensor]] | None,
        states: Sequence[Tensor] | None = None,
        whole: bool = False,
    ) -> list[tuple[list[int], Tensor]]:
        """Scaled orthogonalized updates, this rank's blocks: per bucket ``(order, (n, *my_block_size))``; with
        ``whole``, every rank receives every whole result instead (for replicated parameters: each owner sends its
        results to every rank, one all-to-all per bucket): ``(order, (n, *shape))``.

        ``params`` give the global shapes, ``blocks`` every rank's ``Block`` of each; ``updates`` are this rank's
        blocks of each update. ``states``: a ``rows_state`` postscale stage's state per parameter, whole and equal
        on every rank: each owner updates those of its matrices, then one all-reduce gives every rank every
        owner's result.
        """
        world, rank = self.world, self.rank
        groups: dict[tuple, list[int]] = {}
        for i, (p, u) in enumerate(zip(params, updates)):
            groups.setdefault((tuple(p.shape), u.dtype, blocks[i]), []).append(i)
        load = [0.0] * world
        buckets = []
        for (shape, _, layout), index in groups.items():
            b = _Bucket(shape, layout, index, assign_jobs([float(ns_flops(shape))] * len(index), world, load))
            for i in index:
                if tuple(updates[i].shape) != b.sizes[rank]:
                    raise ValueError(
                        f"a DTensor of shape {shape} has a local shard of shape {tuple(updates[i].shape)} on rank "
                        f"{rank}; its placements put a block of shape {b.sizes[rank]} there"
                    )
            buckets.append(b)

        # 1. a bucket's blocks go to their owners: the next bucket's are in flight while one bucket's NS runs (one
        # bucket ahead, so the staging buffers hold two buckets at most, never the whole model)
        def send_to_owners(b: _Bucket) -> None:
            wire = self.comm_dtype or updates[b.order[0]].dtype
            send = torch.stack([updates[i] for i in b.order]).to(wire)  # (n, *size_me), owner-sorted
            send_splits = [c * b.numel[rank] for c in b.count]
            recv_splits = [b.count[rank] * n for n in b.numel]
            b.recv, b.work = self._a2a(send.reshape(-1), send_splits, recv_splits)

        if buckets:
            send_to_owners(buckets[0])

        # 2. per bucket: whole matrices on their owner, NS there, each rank's block sent back (or every result to
        # every rank)
        for k, b in enumerate(buckets):
            if k + 1 < len(buckets):
                send_to_owners(buckets[k + 1])
            mine = b.count[rank]
            first = updates[b.order[0]]
            b.uniform, b.scale = _uniform_scale(b.shape, lr, adjust_lr, ns["matrix_view"], ns["split"])
            work_dtype = ns["ns_dtype"] or default_ns_dtype(first.device, first.dtype)
            out_dtype = self.comm_dtype or (work_dtype if b.uniform else first.dtype)
            b.work.wait()
            assert b.recv is not None
            recv, b.recv = b.recv, None  # freed with this bucket
            outs = torch.empty((mine, *b.shape), dtype=out_dtype, device=first.device)
            if mine:
                full = torch.empty((mine, *b.shape), dtype=first.dtype, device=first.device)
                for where, size, piece in zip(b.where, b.sizes, recv.split([mine * n for n in b.numel])):
                    full[where] = piece.view(mine, *size)
                # with one lr scale per parameter, results travel unscaled in the NS dtype and the receiver
                # scales them as one process does; otherwise they travel scaled, in the update dtype
                rule = (
                    {"lr": 1.0, "adjust_lr": None, "report_lr": (lr, adjust_lr)}
                    if b.uniform
                    else {"lr": lr, "adjust_lr": adjust_lr}
                )
                kept = None if states is None else [states[i] for i in b.owned(rank)]
                run_all(ns_jobs(list(full.unbind(0)), list(outs.unbind(0)), ns=ns, stats=stats, states=kept, **rule))
            if whole:  # this rank's results to every rank: an all-gather of uneven shares, without padding
                each = math.prod(b.shape)
                send = outs.reshape(1, -1).expand(world, -1).reshape(-1)
                b.out_recv, b.out_work = self._a2a(send, [mine * each] * world, [c * each for c in b.count])
                continue
            send = torch.cat([outs[where].reshape(-1) for where in b.where])
            send_splits = [mine * n for n in b.numel]
            recv_splits = [c * b.numel[rank] for c in b.count]
            b.out_recv, b.out_work = self._a2a(send, send_splits, recv_splits)

        if states is not None:  # every owner's new states to every rank: the others add zeros
            self._share_states(buckets, states)

        # 3. this rank's block of every result (or the whole results): one tensor per bucket, owner-sorted
        stacks = []
        for b in buckets:
            b.out_work.wait()
            assert b.out_recv is not None
            first = updates[b.order[0]]
            got = b.out_recv.view(len(b.order), *(b.shape if whole else b.sizes[rank]))
            out = torch.empty(got.shape, dtype=first.dtype, device=first.device)
            if b.uniform:
                torch.mul(got, b.scale, out=out)
            else:
                out.copy_(got)
            stacks.append((b.order, out))
        return stacks

    def _share_states(self, buckets: list[_Bucket], states: Sequence[Tensor]) -> None:
        """One all-reduce (sum) in which each state holds its owner's new values and zeros elsewhere."""
        mine = {i for b in buckets for i in b.owned(self.rank)}
        ordered = [i for b in buckets for i in b.order]
        flat = torch.cat([states[i].reshape(-1) if i in mine else torch.zeros_like(states[i]).reshape(-1)
                          for i in ordered])  # fmt: skip
        dist.all_reduce(flat, group=self.group)
        if self.counter is not None:
            self.counter[0] += 2 * (self.world - 1) * flat.numel() * flat.element_size() // self.world
        unpack(flat, [states[i] for i in ordered])

    def run(self, params: Sequence[Tensor], *args: Any, **kwargs: Any) -> list[Tensor]:
        """``run_stacked``'s results as one tensor per parameter, in the parameters' order."""
        results: list[Tensor | None] = [None] * len(params)
        for order, stack in self.run_stacked(params, *args, **kwargs):
            for i, o in zip(order, stack.unbind(0)):
                results[i] = o
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]


def _uniform_scale(shape: tuple[int, ...], lr: float, adjust_lr: Any, view: str, split: Any) -> tuple[bool, float]:
    """(whether all parts of a parameter of ``shape`` share one lr scale, that scale); once per bucket and step."""
    parts = matrix_parts(torch.empty(shape, device="meta"), view, split)
    scales = {lr_scale(adjust_lr, lr, (int(q.shape[-2]), int(q.shape[-1]))) for q in parts}
    return len(scales) == 1, next(iter(scales))
