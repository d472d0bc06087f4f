"""Step plans: the fused CUDA path of ``muon_steps``, worked out once per step structure and remembered.

A plan merges same-shape matrices of all calls (and transposes) into NS batches, places each matrix in its
tensor and keys each batch's CUDA graphs; ``functional._muon_steps``
runs it. Where every call took the fused path, the plan is remembered with a guard over its tensors' metadata
(``accel.guards``), so that a later step with the same structure runs it without re-checking each tensor in
Python. Plans and remembered entries are kept in small bounded caches (``_MAX_PLANS``, ``_MAX_REMEMBERED``).
The arithmetic is that of ``stages`` (the torch path), in fewer passes: ``accel.fused`` for the element-wise
stages, ``newton_schulz.orthogonalize_filled`` for the orthogonalization.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections import OrderedDict, defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..accel import cuda_graphs, fused, kernels
from ..coefficients import as_preset
from ..newton_schulz import (
    default_ns_dtype,
    filled_graph_key,
    orthogonalize_filled,
    restart_positions,
)
from .options import plan_key
from .parts import matrix_offsets
from .pipeline import get_stage
from .stages import StepCall, _record_stats, lr_scale

__all__: list[str] = []


@dataclass
class _Run:
    """The matrices of one call and one (rows, cols, dtypes) inside a merged NS batch, rows ``first`` on."""

    call: int  # index of the call (parameter group) in ``muon_steps``' calls
    first: int
    rows: int
    cols: int
    owners: list[int]  # per matrix: index of its tensor in the call's lists
    offsets: list[int]  # per matrix: element offset inside that tensor
    distinct: list[int]  # the owners, each once (one data_ptr per owning tensor)
    norm_scale: float
    buf_dtype: torch.dtype
    nesterov: bool
    eps: float
    precondition: str = "none"  # the pipeline stage applied to these matrices of the NS input (``in_place``)


@dataclass
class _Batch:
    """One merged NS batch of a step plan, with what its CUDA-graph replay needs, computed once."""

    runs: list[_Run]
    size: int
    m: int
    n: int
    work: torch.dtype
    schedule: tuple
    method: str
    device: torch.device
    slot: tuple = ()  # what the batch computes (``cuda_graphs.replays``' slot), apart from the tensors' addresses
    checked_slot: tuple = ()  # the same with its state-changing passes masked by a ``found_inf`` flag
    estimate: int = 0  # bytes its captured graph's pool takes (for the cache's bound)
    ns_graph: tuple = ()  # the key of the NS-only graph a capture of the whole batch makes unnecessary
    restarts: tuple[int, ...] = ()  # Gram NS's restart positions (resolved; () for other methods)
    grad_table: fused.AddressTable | None = None  # the gradients' addresses on the device, read by its graph
    table_ptrs: list[int] | None = None  # the plan's ``_grad_ptrs`` when ``grad_table`` was last written


class _StepPlan:
    """What ``_fused_muon_steps`` works out from the structure of its calls alone (shapes and dtypes of the
    tensors; options other than lr, momentum and weight decay): the merged NS batches, where each matrix lies,
    the CUDA-graph slot of each batch. A training loop repeats one structure, so the plan is made once and
    each step only reads the tensors' addresses and the current numbers (``_plan_for`` keeps the plans)."""

    def __init__(self, calls: Sequence[StepCall], streams: Streams | None) -> None:
        merged: dict[tuple, list[tuple[int, _Run, int, int]]] = defaultdict(list)
        for j, (params, grads, bufs, opts) in enumerate(calls):
            preset = as_preset(opts["coefficients"])  # the structure's key has this preset (same rows)
            schedule = tuple(tuple(r) for r in preset.schedule(opts["ns_steps"]))
            per_shape: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
            for o, p in enumerate(params):
                for r, c, offsets in matrix_offsets(p.shape, opts["matrix_view"], opts["split"]):
                    if r and c:  # an empty matrix: nothing to update (and its buffer has no entries either)
                        per_shape[(r, c, p.dtype, grads[o].dtype, bufs[o].dtype)].extend((o, k) for k in offsets)
            device = params[0].device
            for (r, c, _, _, buf_dtype), mats in per_shape.items():
                work = opts["ns_dtype"] or default_ns_dtype(device, buf_dtype)
                run = _Run(j, 0, r, c, [], [], [], preset.norm_scale, buf_dtype, opts["nesterov"], opts["eps"],
                           opts["precondition"])  # fmt: skip
                merged[(*merge_key(r, c, work, schedule, opts), device)].extend((j, run, o, k) for o, k in mats)
        self.batches: list[_Batch] = []
        total = sum(len(entries) * key[0] * key[1] for key, entries in merged.items())
        # widest matrices first: a graph pool's blocks, once freed, serve later captures of narrower ones
        for (m, n, work, schedule, method, restarts, max_batch, device), entries in sorted(
            merged.items(), key=lambda item: -item[0][0] * item[0][1]
        ):
            start = 0
            for size in batch_sizes(len(entries), m, n, max_batch, total):
                self.batches.append(
                    self._batch(entries[start : start + size], m, n, work, schedule, method, restarts, device)
                )
                start += size
        self.devices = list(dict.fromkeys(batch.device for batch in self.batches))
        self._grad_ptrs: list[int] | None = None  # the gradients' addresses the batches' tables were written for
        if streams is not None:  # graph replay allowed: ``streams`` has each device's current stream
            for batch in self.batches:
                self._graph_keys(batch, calls, streams[batch.device])

    @staticmethod
    def _batch(entries: list[tuple[int, _Run, int, int]], m: int, n: int, work: torch.dtype, schedule: tuple,
               method: str, restarts: tuple[int, ...], device: torch.device) -> _Batch:  # fmt: skip
        """One batch from ``entries`` (call, run template, owner, offset), consecutive per run."""
        runs: list[_Run] = []
        last = None
        for i, (_, template, o, k) in enumerate(entries):
            if template is not last:  # a new (call, shape, dtypes) starts
                runs.append(dataclasses.replace(template, first=i, owners=[], offsets=[], distinct=[]))
                last = template
            run = runs[-1]
            run.owners.append(o)
            run.offsets.append(k)
            if not run.distinct or run.distinct[-1] != o:
                run.distinct.append(o)
        return _Batch(runs, len(entries), m, n, work, schedule, method, device, restarts=restarts)

    @staticmethod
    def _graph_keys(batch: _Batch, calls: Sequence[StepCall], stream: tuple[int, int]) -> None:
        b, m, n, work, device = batch.size, batch.m, batch.n, batch.work, batch.device
        tensors = [(run, calls[run.call]) for run in batch.runs]
        runs = tuple(
            (run.rows, run.cols, call[1][run.owners[0]].dtype, call[2][run.owners[0]].dtype,
             call[0][run.owners[0]].dtype, run.buf_dtype, run.nesterov, run.norm_scale, run.eps, run.precondition,
             _decays(call[3]), tuple(run.owners), tuple(run.offsets))
            for run, call in tensors
        )  # fmt: skip
        mode = kernels.get_mode()
        batch.slot = cuda_graphs.Key(
            (device, stream, m, n, work, batch.schedule, batch.method, batch.restarts, mode, runs)
        )
        batch.checked_slot = cuda_graphs.Key((*batch.slot, "found_inf"))
        batch.estimate = 4 * b * (m * n + m * m) * work.itemsize  # NS input, X, A, P and the next X
        batch.ns_graph = filled_graph_key((b, m, n), batch.schedule, work, device, batch.method, batch.restarts)

    def run(self, calls: Sequence[StepCall], streams: Streams | None = None, found_inf: Tensor | None = None,
            grad_ptrs: list[int] | None = None) -> None:  # fmt: skip
        """One step of ``calls`` (the structure this plan was made for) with their current tensors and numbers.
        ``streams``: ``_streams(calls)`` where the caller has read it. ``found_inf``: a float32 one-element tensor
        on a device of the plan (``nonfinite.found_inf_flag``); where it holds a nonzero value when the step's
        kernels run, they change no buffer and no parameter of that device (its batches' replays read it too).
        ``grad_ptrs``: every call's gradients' ``data_ptr()``, call after call, where the caller has read them.
        A batch's gradient table is rewritten only where they differ from those it was last written for (a loop's
        gradients usually come back at the same addresses: no per-matrix work then)."""
        graphable = {d: cuda_graphs.graphable_on(d) for d in self.devices}
        if any(opts["stats"] is not None for _, _, _, opts in calls):  # diagnostics: every batch eagerly
            graphable = dict.fromkeys(self.devices, False)
        if any(graphable.values()):
            if grad_ptrs is None:
                grad_ptrs = [ptr for call in calls for ptr in map(_data_ptr, call[1])]
            if grad_ptrs != self._grad_ptrs:
                self._grad_ptrs = grad_ptrs  # a new list: every batch's table is rewritten before its replay
        for batch in self.batches:
            numbers = []  # per run: (scale, decay, momentum)
            for run in batch.runs:
                opts = calls[run.call][3]
                scale = lr_scale(opts["adjust_lr"], opts["lr"], (run.rows, run.cols))
                numbers.append((scale, 1 - opts["lr"] * opts["weight_decay"], opts["momentum"]))
            stats = [calls[run.call][3]["stats"] for run in batch.runs]
            flag = found_inf if found_inf is not None and found_inf.device == batch.device else None
            step = functools.partial(_run_batch, batch, calls, numbers, stats, flag)
            if not batch.slot or not graphable[batch.device]:
                step(None, None)
                continue
            if batch.table_ptrs is not self._grad_ptrs or batch.grad_table is None:
                _grad_table(batch, calls)
                batch.table_ptrs = self._grad_ptrs
            assert batch.grad_table is not None
            table = batch.grad_table.table
            addresses = [table.data_ptr()]  # the gradients' own addresses are read from the table, not captured
            for run in batch.runs:  # read per batch, so that the first batch replays before the rest are read
                params, _, bufs, _ = calls[run.call]
                addresses += [params[o].data_ptr() for o in run.distinct]
                addresses += [bufs[o].data_ptr() for o in run.distinct]
            values = [v for scale, decay, mu in numbers for v in (scale, decay, 1 - mu, mu)]
            slot = batch.slot if flag is None else batch.checked_slot  # the flag's address is in the capture
            cuda_graphs.replays.run(
                slot, tuple(addresses), values, functools.partial(step, table), batch.device, batch.estimate,
                replaces=batch.ns_graph,
            )  # fmt: skip


def _grad_table(batch: _Batch, calls: Sequence[StepCall]) -> Tensor:
    """The batch's gradient addresses in device memory (``fused.momentum_normalise``'s ``grad_table``), rewritten
    where they changed since the last step: its captured graph then replays on gradients that a loop allocated
    anew (``zero_grad(set_to_none=True)`` lets them land elsewhere from one step to the next)."""
    addresses: list[int] = []
    for run in batch.runs:
        addresses += fused.Matrices(calls[run.call][1], run.owners, run.offsets, run.rows, run.cols).addresses()
    if batch.grad_table is None:
        batch.grad_table = fused.AddressTable(batch.size, batch.device)
    return batch.grad_table.update(addresses)


def _precondition(X: Tensor, divisors: Tensor | None, run: _Run) -> None:
    """A run's precondition stage on its matrices ``X`` of the NS input (parameter orientation), in place
    (``pipeline.Stage.in_place``), then NS's normalisation again as the torch path does it after the stage: none
    for a stage that ``normalises``; else ``X / (norm_scale ||X||_F + eps)``. ``divisors``: the run's part of the
    divisors NS divides by (``orthogonalize_filled(..., unnormalised=True)``), set instead of dividing ``X``."""
    stage = get_stage("precondition", run.precondition)
    assert stage.in_place is not None  # fused_stages: only such stages reach a plan
    stage.in_place(X)
    if stage.normalises:
        if divisors is not None:
            divisors.fill_(1.0)
        return
    divisor = torch.linalg.vector_norm(X, dim=(-2, -1), dtype=torch.float32) * run.norm_scale + run.eps
    if divisors is not None:
        divisors.copy_(divisor)
    else:
        X.mul_(divisor.reciprocal_().view(-1, 1, 1))


def _decays(opts: dict[str, Any]) -> bool:
    """Whether the step has weight decay (a kernel argument, so part of a plan's structure)."""
    return 1 - opts["lr"] * opts["weight_decay"] != 1.0


class _Live(NamedTuple):
    """One run of a batch in this step: its matrices in the current tensors and its current numbers."""

    run: _Run
    grads: fused.Matrices
    bufs: fused.Matrices
    params: fused.Matrices
    scalars: Tensor | None  # this run's [scale, decay, 1 - momentum, momentum] on the device, or None
    scale: float
    decay: float
    momentum: float
    stats: dict[str, list[Tensor]] | None


def _run_batch(batch: _Batch, calls: Sequence[StepCall], numbers: list[tuple[float, float, float]],
               stats: list[dict | None], found_inf: Tensor | None, grad_table: Tensor | None,
               scalars: Tensor | None) -> None:  # fmt: skip
    """The kernels of one merged batch: per run a momentum pass writing its slice of the NS input, the NS
    products, per run an update pass. ``scalars``: per run ``[scale, decay, 1 - momentum, momentum]`` on the
    device (what a captured graph reads), or ``None`` for plain kernel arguments. ``grad_table``: the batch's
    gradient addresses on the device (``_grad_table``), or ``None`` for kernel arguments. ``found_inf``: see
    ``_StepPlan.run``."""
    live = []
    for j, run in enumerate(batch.runs):
        params, grads, bufs, _ = calls[run.call]
        g, b, p = (fused.Matrices(ts, run.owners, run.offsets, run.rows, run.cols) for ts in (grads, bufs, params))
        part = None if scalars is None else scalars[4 * j : 4 * j + 4]
        live.append(_Live(run, g, b, p, part, *numbers[j], stats[j]))

    def rows_of(X: Tensor, run: _Run) -> Tensor:
        part = X[run.first : run.first + len(run.owners)]
        return part.mT if run.rows > run.cols else part

    def fill(X: Tensor, d: Tensor | None = None) -> None:
        for r in live:
            mine = slice(r.run.first, r.run.first + len(r.run.owners))  # this run's entries of d and the table
            part = None if d is None else d[mine]
            fused.momentum_normalise(
                r.grads, r.bufs, rows_of(X, r.run), momentum=r.momentum, nesterov=r.run.nesterov,
                norm_scale=r.run.norm_scale, eps=r.run.eps, scalars=r.scalars, denom=part, found_inf=found_inf,
                grad_table=None if grad_table is None else grad_table[mine],
            )  # fmt: skip
            if r.run.precondition != "none":
                _precondition(rows_of(X, r.run), part, r.run)

    # bf16 input inside a captured batch (or with graphs off): written undivided, the NS products divide (one pass
    # over the input fewer). Not with eps = 0: an undivided input of tiny entries could underflow in X X^T.
    unnormalised = (
        _FOLD_NORMALISATION
        and batch.work == torch.bfloat16
        and all(r.run.eps > 0 for r in live)
        and (scalars is not None or not cuda_graphs.graphable_on(batch.device))
        and not torch.compiler.is_compiling()
    )
    shape = (batch.size, batch.m, batch.n)
    # a batch headed for capture (scalars given) runs eagerly first: there choose kernels as the capture will
    with kernels.capture_warmup() if unnormalised and scalars is not None else contextlib.nullcontext():
        O = orthogonalize_filled(fill, shape, batch.schedule, batch.work, batch.device, batch.method,
                                 batch.restarts, unnormalised=unnormalised)  # fmt: skip
    for r in live:
        part = rows_of(O, r.run)
        fused.scaled_update(
            r.params,
            part,
            scale=r.scale,
            decay=r.decay,
            update_dtype=r.run.buf_dtype,
            scalars=r.scalars,
            found_inf=found_inf,
        )
        if r.stats is not None:
            _record_stats(r.stats, part, r.scale)


_data_ptr = Tensor.data_ptr
_FOLD_NORMALISATION = True  # bf16 fused steps: the NS products divide by the norms (benchmarks turn it off to compare)
_PLANS: OrderedDict[Hashable, _StepPlan] = OrderedDict()  # the step plans of recently seen structures
_MAX_PLANS = 32


def _plan_for(calls: Sequence[StepCall], streams: Streams | None) -> _StepPlan:
    """The step plan of ``calls``' structure with ``streams`` current (``_streams``): remembered (a few dozen,
    least recently used dropped), except under ``torch.compile`` (traced once anyway) or where an option cannot
    be a dictionary key."""
    if torch.compiler.is_compiling():
        return _StepPlan(calls, None)
    key: Hashable = (_stream_ids(streams), kernels.get_mode(), tuple(
        (plan_key(opts), _decays(opts), tuple((p.shape, p.dtype, g.dtype, b.dtype) for p, g, b in zip(ps, gs, bs)),
         ps[0].device)
        for ps, gs, bs, opts in calls
    ))  # fmt: skip
    try:
        plan = _PLANS.get(key)
    except TypeError:  # an unhashable option (a custom coefficient object): plan every step
        return _StepPlan(calls, streams)
    if plan is None:
        plan = _PLANS[key] = _StepPlan(calls, streams)
        while len(_PLANS) > _MAX_PLANS:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan


Streams = dict[torch.device, tuple[int, int]]  # per device: its current stream (``cuda_graphs.stream_key``)


def _streams(calls: Sequence[StepCall]) -> Streams | None:
    """Each device's current stream, where graphs may be replayed now (a captured graph is bound to its stream);
    else ``None``. Read once per step, for the plan's key and its graphs' keys."""
    return _streams_on(_devices(calls))


def _devices(calls: Sequence[StepCall]) -> list[torch.device]:
    """The devices of ``calls``' parameters, in the calls' order, each once."""
    return list(dict.fromkeys(call[0][0].device for call in calls))


def _streams_on(devices: Sequence[torch.device]) -> Streams | None:
    """``_streams`` of calls on ``devices`` (in the calls' order, each once)."""
    if not devices or not cuda_graphs.graphable_on(devices[0]):
        return None
    return {d: cuda_graphs.stream_key(d) for d in devices}


def _stream_ids(streams: Streams | None) -> tuple | None:
    """``streams`` as a key."""
    return None if streams is None else tuple(streams.items())


def _fused_muon_steps(calls: Sequence[StepCall], streams: Streams | None, found_inf: Tensor | None = None) -> _StepPlan:
    """``muon_step(params, grads, bufs, **options)`` for every call through the fused kernels, with the NS batches
    shared: matrices of every call that have the same NS problem (``min x max`` shape after flattening and
    splitting, NS precision, schedule, method, ``max_batch``, device) are orthogonalized together, whatever
    their group's other hyper-parameters and whichever way round they stand (``3072 x 768`` and ``768 x 3072``
    share a batch; the momentum kernel writes the transposed ones transposed). Per batch: one momentum pass per
    (call, shape) writes its slice of the normalised NS input, the NS products run once, one update pass per
    (call, shape) applies weight decay and its scaled slice. Same arithmetic per matrix as the torch path.

    In eager mode on CUDA a whole batch (momentum kernels, NS products, update kernels) is replayed from a CUDA
    graph once it has run twice on the same tensors (``cuda_graphs.replays``): one launch instead of dozens, with
    the learning rate, weight decay and momentum read from device memory so that schedules change them without
    a new capture. The batches and their graph keys come from a step plan made once per structure, so the host
    work per step is reading addresses and numbers. ``streams``: ``_streams(calls)`` (read once per step by the
    caller). ``found_inf``: see ``_StepPlan.run``. Returns that plan."""
    plan = _plan_for(calls, streams)
    plan.run(calls, streams, found_inf)
    return plan


# The memory pool that a step's captured batches share holds the NS intermediates of its largest batch (at the
# peak two or three copies of the batch in the NS precision, 2 bytes an entry in bf16, and the m x m products). A
# batch of at most POOL_SHARE of the step's matrix entries keeps that under the momentum buffers (4 bytes an entry
# of every matrix): on a 12 x 768 GPT (H200) the graphs held 630 MB against 330 MB of state with whole batches.
# Batches below POOL_MIN_ENTRIES are never cut, so a small model's matrices still go in one launch each.
POOL_SHARE = 0.5
POOL_MIN_ENTRIES = 1 << 24


def batch_sizes(count: int, m: int, n: int, max_batch: int | None, total: int) -> list[int]:
    """The sizes of the NS batches that ``count`` merged ``m x n`` matrices are cut into, in order: ``max_batch``
    each where it is given; else as few batches of (nearly) equal size as keep each within ``POOL_SHARE`` of
    ``total`` (the entries of all the step's matrices) or ``POOL_MIN_ENTRIES``, whichever is larger."""
    if max_batch:
        return [min(max_batch, count - start) for start in range(0, count, max_batch)]
    per = max(1, int(max(POOL_SHARE * total, POOL_MIN_ENTRIES)) // (m * n))
    parts = -(-count // per)
    size, extra = divmod(count, parts)
    return [size + 1] * extra + [size] * (parts - extra)


def merge_key(rows: int, cols: int, work: torch.dtype, schedule: tuple, opts: dict[str, Any]) -> tuple:
    """What matrices must share to share a merged NS batch: ``(m, n, NS dtype, schedule, method, restart positions,
    max_batch)``; the positions resolved (``None`` and the default placement written out share a batch), ``()``
    where the method has none."""
    restarts = restart_positions(opts["restarts"], len(schedule)) if opts["method"] in ("gram", "auto") else ()
    return (min(rows, cols), max(rows, cols), work, schedule, opts["method"], restarts, opts["max_batch"])
