"""Functional Muon and AdamW steps (no optimizer state objects, just lists of tensors).

Muon (Jordan 2024; torch.optim.Muon conventions):

    buf    <- buf + (1 - mu) (g - buf)                 # buf.lerp_(g, 1 - mu)
    u      <- g + mu (buf - g)   if nesterov else buf  # g.lerp(buf, mu)
    O      <- orthogonalize(view(u))                   # conv: (out, in*k*k); fused: split rows
    p      <- p (1 - lr wd) - lr * s(rows, cols) * O   # decoupled weight decay, shape-aware scale s

AdamW (Loshchilov & Hutter 2019), written to match torch.optim.AdamW step for step.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import cuda_graphs, fused, kernels
from ..coefficients import CoefficientSpec, as_preset
from ..newton_schulz import (
    default_ns_dtype,
    filled_graph_key,
    orthogonalize,
    orthogonalize_filled,
    orthogonalize_stack,
)

__all__ = [
    "ADJUST_LR_MODES",
    "MATRIX_VIEWS",
    "AdjustLR",
    "Job",
    "adamw_step",
    "apply_update",
    "lr_scale",
    "matrix_offsets",
    "matrix_parts",
    "merged_ns_batches",
    "momentum_update",
    "muon_step",
    "muon_steps",
    "ns_batches",
    "ns_flops",
    "ns_jobs",
    "run_all",
    "split_sizes",
]

AdjustLR = str | float | None | Callable[[float, tuple[int, int]], float]
ADJUST_LR_MODES = ("original", "match_rms_adamw", None)
MATRIX_VIEWS = ("flatten", "batch")
SplitSpec = int | Sequence[int] | None


@dataclass
class Job:
    """One batched orthogonalization: ``run()`` fills ``outputs`` (views into the update buffers)."""

    cost: float
    run: Callable[[], None]
    outputs: list[Tensor]
    key: Any = None  # jobs with one key (same shape and dtype) may be exchanged together


Executor = Callable[[list[Job]], None]
StepCall = tuple[Sequence[Tensor], Sequence[Tensor], Sequence[Tensor], dict[str, Any]]  # muon_steps: one group


def run_all(jobs: list[Job]) -> None:
    """The single-process executor: every job here, in order."""
    for j in jobs:
        j.run()


def lr_scale(adjust_lr: AdjustLR, lr: float, shape: tuple[int, int]) -> float:
    """The learning rate actually applied to an orthogonalized matrix of ``shape = (rows, cols)``.

    * ``"original"`` (Jordan): ``lr * sqrt(max(1, rows / cols))``;
    * ``"match_rms_adamw"`` (Moonlight, Liu et al. 2025): ``lr * 0.2 * sqrt(max(rows, cols))``,
      which gives the update the RMS of a typical AdamW update so AdamW's lr and wd carry over;
    * a number ``f > 0``: ``lr * f * sqrt(max(rows, cols))`` (``"match_rms_adamw"`` with your own factor
      instead of 0.2: the update RMS is then about ``f``);
    * ``None``: ``lr``; a callable ``f(lr, (rows, cols)) -> float``: whatever it returns.
    """
    rows, cols = shape
    if adjust_lr is None:
        return lr
    if isinstance(adjust_lr, int | float) and not isinstance(adjust_lr, bool):
        if not (adjust_lr > 0 and math.isfinite(adjust_lr)):
            raise ValueError(f"a numeric adjust_lr is a scale factor and must be finite and > 0, got {adjust_lr!r}")
        return lr * float(adjust_lr) * math.sqrt(max(rows, cols))
    if adjust_lr == "original":
        return lr * math.sqrt(max(1.0, rows / max(cols, 1)))  # an empty matrix has an empty update
    if adjust_lr == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    if callable(adjust_lr):
        return float(adjust_lr(lr, (rows, cols)))
    raise ValueError(f"adjust_lr must be one of {ADJUST_LR_MODES}, a number > 0 or a callable, got {adjust_lr!r}")


def split_sizes(split: SplitSpec, rows: int) -> list[int]:
    """Row sizes of the parts a fused matrix with ``rows`` rows is cut into (``[rows]`` when not split)."""
    if split is None:
        return [rows]
    if isinstance(split, bool):
        raise ValueError(f"split must be None, an int or a list of row counts, got {split!r}")
    if isinstance(split, int):
        if split < 1 or rows % split:
            raise ValueError(f"split={split}: {rows} rows cannot be cut into {split} equal parts")
        return [rows // split] * split
    sizes = [int(s) for s in split]
    if any(s < 1 for s in sizes) or sum(sizes) != rows:
        raise ValueError(f"split={list(split)}: part sizes must be positive and add up to the {rows} rows")
    return sizes


def matrix_parts(u: Tensor, matrix_view: str, split: SplitSpec) -> list[Tensor]:
    """The matrices Muon orthogonalizes for one parameter-shaped update ``u``, as views of ``u``.

    2-D: ``u`` itself. More dims: ``"flatten"`` (conv kernels) gives ``(out, in*k*...)``; ``"batch"``
    keeps leading dims as a batch of matrices (e.g. MoE expert stacks). ``split`` cuts the rows
    (dim -2 of that view) into parts orthogonalized separately (e.g. fused Q, K, V).
    """
    if u.ndim > 2 and matrix_view == "flatten":
        u = u.reshape(u.shape[0], -1)
    return list(u.split(split_sizes(split, u.shape[-2]), dim=-2))


def _offsets_of(shape: Sequence[int], matrix_view: str, split: SplitSpec) -> list[tuple[int, int, list[int]]]:
    """``matrix_offsets``, remembered per (shape, view, split) (the fused step asks every step)."""
    if torch.compiler.is_compiling():  # traced once anyway; no cache lookups in the graph
        return matrix_offsets(shape, matrix_view, split)
    key = tuple(split) if isinstance(split, list | tuple) else split
    return _offsets_cached(tuple(shape), matrix_view, key)


@functools.lru_cache(maxsize=4096)
def _offsets_cached(shape: tuple[int, ...], matrix_view: str, split: SplitSpec) -> list[tuple[int, int, list[int]]]:
    return matrix_offsets(shape, matrix_view, split)


def matrix_offsets(shape: Sequence[int], matrix_view: str, split: SplitSpec) -> list[tuple[int, int, list[int]]]:
    """Where the matrices of ``matrix_parts`` lie in a contiguous tensor of ``shape``: per part, ``(rows, cols,
    element offsets of its matrices)`` (one offset per leading index of a ``"batch"`` view). Arithmetic only:
    no tensor is looked at (``storage_offset()`` would break a ``torch.compile`` graph)."""
    if len(shape) > 2 and matrix_view == "flatten":
        shape = (shape[0], math.prod(shape[1:]))
    rows, cols = shape[-2], shape[-1]
    count = math.prod(shape[:-2])
    parts, r0 = [], 0
    for r in split_sizes(split, rows):
        parts.append((r, cols, [e * rows * cols + r0 * cols for e in range(count)]))
        r0 += r
    return parts


def momentum_update(
    grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor], momentum: float, nesterov: bool
) -> list[Tensor]:
    """Advance the momentum buffers in place; return the updates to orthogonalize (Nesterov blend or the buffers)."""
    grads32 = [g.to(b.dtype) for g, b in zip(grads, momentum_buffers)]
    torch._foreach_lerp_(list(momentum_buffers), grads32, 1 - momentum)
    return list(torch._foreach_lerp(grads32, list(momentum_buffers), momentum)) if nesterov else list(momentum_buffers)


def ns_jobs(
    updates: Sequence[Tensor],
    outputs: Sequence[Tensor],
    *,
    lr: float,
    coefficients: CoefficientSpec,
    ns_steps: int | None,
    adjust_lr: AdjustLR,
    eps: float,
    ns_dtype: torch.dtype | None = None,
    method: str = "newton_schulz",
    matrix_view: str = "flatten",
    split: SplitSpec = None,
    max_batch: int | None = None,
    parts: int = 1,
    stats: dict[str, list[Tensor]] | None = None,
    report_lr: tuple[float, AdjustLR] | None = None,
) -> list[Job]:
    """The batched orthogonalizations that write ``lr_scale(adjust_lr, lr, shape) * orthogonalize(u)`` into
    ``outputs`` (one output per update, same shape, any floating dtype), as jobs for an executor.

    Matrices of the same shape, dtype and device (after flattening and splitting) are stacked into calls of
    at most ``max_batch`` (``None``: all, cut into ``parts`` pieces so that a distributed executor can
    balance few shapes). ``report_lr = (lr, adjust_lr)`` is what the statistics' update RMS uses when the
    outputs are written unscaled (``lr=1, adjust_lr=None``) and scaled later.
    """
    batches: dict[tuple, list[tuple[Tensor, Tensor]]] = defaultdict(list)
    for u, out in zip(updates, outputs):
        for src, dst in zip(matrix_parts(u, matrix_view, split), matrix_parts(out, matrix_view, split)):
            batches[(tuple(src.shape), src.dtype, src.device)].append((src, dst))

    preset = as_preset(coefficients)
    rows = preset.schedule(ns_steps)

    def job(pairs: list[tuple[Tensor, Tensor]], shape: tuple, work: torch.dtype, scale: float, rms: float) -> None:
        srcs = [src for src, _ in pairs]
        if srcs[0].numel() == 0:  # empty matrices: nothing to orthogonalize, a zero update
            for _, dst in pairs:
                dst.zero_()
            return
        if method == "svd":
            ortho = orthogonalize(torch.stack(srcs), method="svd")
        else:  # possibly a CUDA graph's static output: consumed below
            ortho = orthogonalize_stack(srcs, rows, preset.norm_scale, eps, work, method)
            ortho = ortho.reshape(len(srcs), *srcs[0].shape)  # "batch" views have leading dims
        for (_, dst), o in zip(pairs, ortho.unbind(0)):
            torch.mul(o, scale, out=dst)  # scale and cast in one pass
        if stats is not None:
            _record_stats(stats, ortho.reshape(-1, *shape[-2:]), rms)

    jobs: list[Job] = []
    for (shape, dtype, device), all_pairs in batches.items():
        scale = lr_scale(adjust_lr, lr, shape[-2:])
        rms = scale if report_lr is None else lr_scale(report_lr[1], report_lr[0], shape[-2:])
        work = ns_dtype or default_ns_dtype(device, dtype)
        chunk = max_batch or math.ceil(len(all_pairs) / parts)
        per_matrix = ns_flops(shape)
        for start in range(0, len(all_pairs), chunk):
            pairs = all_pairs[start : start + chunk]
            jobs.append(
                Job(
                    cost=float(per_matrix * len(pairs)),
                    run=functools.partial(job, pairs, shape, work, scale, rms),
                    outputs=[dst for _, dst in pairs],
                    key=(shape, dtype),
                )
            )
    return jobs


def ns_batches(
    shapes: Sequence[Sequence[int]],
    *,
    matrix_view: str = "flatten",
    split: SplitSpec = None,
    max_batch: int | None = None,
    parts: int = 1,
) -> list[tuple[int, int, int]]:
    """``(b, m, n)``, ``m <= n``, of every batched orthogonalization ``ns_jobs`` makes for parameters of these
    shapes (computed on meta tensors: nothing is allocated). What the kernel tuner prepares for."""
    metas = [torch.empty(tuple(s), device="meta") for s in shapes]
    jobs = ns_jobs(
        metas, metas, lr=1.0, coefficients="jordan", ns_steps=1, adjust_lr=None, eps=0.0,
        matrix_view=matrix_view, split=split, max_batch=max_batch, parts=parts,
    )  # fmt: skip
    batches = []
    for j in jobs:
        shape = j.key[0]
        m, n = sorted(shape[-2:])
        batches.append((len(j.outputs) * math.prod(shape[:-2]), m, n))
    return batches


def _record_stats(stats: dict[str, list[Tensor]], ortho: Tensor, rms: float) -> None:
    """Append one batch's statistics (device tensors, no host sync) of its NS outputs ``ortho`` (``(b, r, c)``)
    whose updates were scaled to RMS ``rms`` times theirs: see ``muon_step``."""
    O = ortho.float()
    O = O.mT if O.shape[-2] > O.shape[-1] else O
    k = O.shape[-2]
    gram_err = torch.linalg.matrix_norm(O @ O.mT - torch.eye(k, device=O.device), ord="fro") / k**0.5
    stats.setdefault("orth_error", []).append(gram_err.max())
    stats.setdefault("update_rms", []).append(rms * O.square().mean().sqrt())
    stats.setdefault("sigma_max", []).append(_top_singular_value(O).max())


def _top_singular_value(O: Tensor, iters: int = 30) -> Tensor:
    """Power-iteration estimate (from below) of each matrix's largest singular value; no host sync."""
    v = torch.ones((*O.shape[:-2], O.shape[-1], 1), dtype=O.dtype, device=O.device)
    for _ in range(iters):
        v = O.mT @ (O @ v)
        v = v / v.norm(dim=-2, keepdim=True).clamp_min(1e-30)
    return (O @ v).norm(dim=(-2, -1))


def ns_flops(shape: Sequence[int], steps: int = 1) -> int:
    """FLOPs of ``steps`` standard quintic NS steps on a (batch of) matrix of ``shape``: 4 m^2 n + 2 m^3, m <= n."""
    m, n = sorted(shape[-2:])
    return (4 * m * m * n + 2 * m**3) * math.prod(shape[:-2]) * steps


def apply_update(params: Sequence[Tensor], updates: Sequence[Tensor], lr: float, weight_decay: float) -> None:
    """``p <- p (1 - lr wd) - update`` for every parameter (the update already carries its lr)."""
    if weight_decay != 0:
        torch._foreach_mul_(list(params), 1 - lr * weight_decay)
    torch._foreach_sub_(list(params), [u.to(p.dtype) for u, p in zip(updates, params)])


def muon_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    coefficients: CoefficientSpec,
    ns_steps: int | None,
    adjust_lr: AdjustLR,
    eps: float,
    ns_dtype: torch.dtype | None = None,
    method: str = "newton_schulz",
    matrix_view: str = "flatten",
    split: SplitSpec = None,
    max_batch: int | None = None,
    executor: Executor | None = None,
    stats: dict[str, list[Tensor]] | None = None,
) -> None:
    """One Muon step, in place, for parameters that share one set of hyper-parameters.

    With ``stats`` (a dict), each job appends device tensors, no host sync: ``"orth_error"`` the largest
    ``||O O^T - I||_F / sqrt(min(m, n))`` of its NS outputs (0 for an exact polar factor of full rank),
    ``"update_rms"`` the RMS of its scaled updates and ``"sigma_max"`` a power-iteration estimate of the
    largest singular value of its NS outputs (1 for an exact polar factor; a preset's band edge otherwise).

    Matrices of the same shape, dtype and device (after flattening and splitting) are orthogonalized
    together in batched ``orthogonalize`` calls of at most ``max_batch`` matrices (``None``: all), which
    caps the extra memory the stacked copies take. Each call is a *job*; ``executor(jobs)`` runs them
    (default: all here; ``muonkit.distributed`` spreads them over ranks and exchanges the results).
    """
    if not params:
        return
    if executor is None and method != "svd" and _fused_step_applies(params, grads, momentum_buffers, ns_dtype):
        options = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, coefficients=coefficients,
            ns_steps=ns_steps, adjust_lr=adjust_lr, eps=eps, ns_dtype=ns_dtype, method=method,
            matrix_view=matrix_view, split=split, max_batch=max_batch, stats=stats,
        )  # fmt: skip
        _fused_muon_steps([(params, grads, momentum_buffers, options)])
        return
    updates = momentum_update(grads, momentum_buffers, momentum, nesterov)
    # One contiguous output per parameter (so the reshaped/split views alias it, whatever the
    # parameter's memory format), filled part by part from batched NS results.
    outputs = [torch.empty(u.shape, dtype=u.dtype, device=u.device) for u in updates]
    jobs = ns_jobs(
        updates,
        outputs,
        lr=lr,
        coefficients=coefficients,
        ns_steps=ns_steps,
        adjust_lr=adjust_lr,
        eps=eps,
        ns_dtype=ns_dtype,
        method=method,
        matrix_view=matrix_view,
        split=split,
        max_batch=max_batch,
        parts=getattr(executor, "parts", 1),
        stats=stats,
    )
    (executor or run_all)(jobs)
    apply_update(params, outputs, lr, weight_decay)


_STEP_DEFAULTS: dict[str, Any] = dict(
    ns_dtype=None, method="newton_schulz", matrix_view="flatten", split=None, max_batch=None, executor=None, stats=None
)


def muon_steps(calls: Sequence[StepCall]) -> None:
    """``muon_step(params, grads, momentum_buffers, **options)`` for every ``(params, grads, momentum_buffers,
    options)`` of ``calls`` (e.g. one per parameter group), the same result as calling them one by one.

    Where the fused CUDA path takes several calls, their same-shape matrices share NS batches: a QKV group's
    768 x 768 parts and another group's 768 x 768 matrices become one batch, and so do ``3072 x 768`` and
    ``768 x 3072`` matrices (NS works on the transpose of the first). Fewer, larger batches keep the GPU
    busier (measured on an H100 for GPT-2 small's four NS batches merged into two:
    ``benchmarks/results/batch_merge_h100.json``).
    """
    fused_calls = []
    for params, grads, bufs, options in calls:
        opts = {**_STEP_DEFAULTS, **options}
        if not params:
            continue
        if (
            opts["executor"] is None
            and opts["method"] != "svd"
            and _fused_step_applies(params, grads, bufs, opts["ns_dtype"])
        ):
            fused_calls.append((params, grads, bufs, opts))
        else:
            muon_step(params, grads, bufs, **opts)
    if fused_calls:
        _fused_muon_steps(fused_calls)


def _fused_step_applies(
    params: Sequence[Tensor], grads: Sequence[Tensor], bufs: Sequence[Tensor], ns_dtype: torch.dtype | None
) -> bool:
    """Whether ``muon_step`` can take the fused CUDA kernels (``muonkit.fused``) for these tensors."""
    if not params[0].is_cuda:
        return False
    work = ns_dtype or default_ns_dtype(params[0].device, bufs[0].dtype)
    tensors = [*params, *grads, *bufs]
    return all(p.shape == g.shape == b.shape for p, g, b in zip(params, grads, bufs)) and fused.applies(tensors, work)


@dataclass
class _Sub:
    """The matrices of one (parameter group, shape, dtypes) inside a merged NS batch."""

    options: dict[str, Any]
    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    bufs: Sequence[Tensor]
    rows: int
    cols: int
    norm_scale: float
    buf_dtype: torch.dtype


def _fused_muon_steps(calls: Sequence[StepCall]) -> None:
    """``muon_step(params, grads, bufs, **options)`` for every call through the fused kernels, with the NS batches
    shared: matrices of every call that have the same NS problem (``min x max`` shape after flattening and
    splitting, NS precision, schedule, method, ``max_batch``, device) are orthogonalized together, whatever
    their group's other hyper-parameters and whichever way round they stand (``3072 x 768`` and ``768 x 3072``
    share a batch; the momentum kernel writes the transposed ones transposed). Per batch: one momentum pass per
    (call, shape) writes its slice of the normalised NS input, the NS products run once (a cached CUDA graph
    where allowed), one update pass per (call, shape) applies weight decay and its scaled slice. Same
    arithmetic per matrix as the torch path."""
    merged: dict[tuple, list[tuple[_Sub, int, int]]] = defaultdict(list)
    for params, grads, bufs, opts in calls:
        preset = as_preset(opts["coefficients"])
        schedule = tuple(tuple(r) for r in preset.schedule(opts["ns_steps"]))
        per_shape: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
        for o, p in enumerate(params):
            for r, c, offsets in _offsets_of(p.shape, opts["matrix_view"], opts["split"]):
                if r and c:  # an empty matrix: nothing to update (and its buffer has no entries either)
                    per_shape[(r, c, p.dtype, grads[o].dtype, bufs[o].dtype)].extend((o, k) for k in offsets)
        device = params[0].device
        for (r, c, _, _, buf_dtype), mats in per_shape.items():
            work = opts["ns_dtype"] or default_ns_dtype(device, buf_dtype)
            sub = _Sub(opts, params, grads, bufs, r, c, preset.norm_scale, buf_dtype)
            merged[(*_merge_key(r, c, work, schedule, opts), device)].extend((sub, o, k) for o, k in mats)
    for (m, n, work, schedule, method, max_batch, device), entries in merged.items():
        chunk = max_batch or len(entries)
        for start in range(0, len(entries), chunk):
            _fused_ns_batch(entries[start : start + chunk], m, n, work, schedule, method, device)


def _merge_key(rows: int, cols: int, work: torch.dtype, schedule: tuple, opts: dict[str, Any]) -> tuple:
    """What matrices must share to share a merged NS batch: ``(m, n, NS dtype, schedule, method, max_batch)``."""
    return (min(rows, cols), max(rows, cols), work, schedule, opts["method"], opts["max_batch"])


def merged_ns_batches(
    calls: Sequence[tuple[Sequence[Sequence[int]], dict[str, Any]]], work: torch.dtype
) -> list[tuple[int, int, int]]:
    """``(b, m, n)``, ``m <= n``, of every NS batch ``muon_steps`` forms on the fused path for calls with parameters
    of these ``shapes`` and these ``options`` (``(shapes, options)`` per call) in NS precision ``work``. What the
    kernel tuner prepares for."""
    counts: dict[tuple, int] = defaultdict(int)
    for shapes, options in calls:
        opts = {**_STEP_DEFAULTS, **options}
        schedule = tuple(tuple(r) for r in as_preset(opts["coefficients"]).schedule(opts["ns_steps"]))
        for shape in shapes:
            for r, c, offsets in matrix_offsets(shape, opts["matrix_view"], opts["split"]):
                if r and c:
                    counts[_merge_key(r, c, work, schedule, opts)] += len(offsets)
    batches = []
    for (m, n, _, _, _, max_batch), count in counts.items():
        chunk = max_batch or count
        batches += [(min(chunk, count - start), m, n) for start in range(0, count, chunk)]
    return batches


@dataclass
class _Segment:
    """The run of one ``_Sub`` inside a merged NS batch, from row ``first`` on."""

    sub: _Sub
    first: int
    grads: fused.Matrices
    bufs: fused.Matrices
    params: fused.Matrices
    scale: float
    decay: float


def _fused_ns_batch(
    entries: list[tuple[_Sub, int, int]], m: int, n: int, work: torch.dtype, schedule: tuple, method: str,
    device: torch.device,
) -> None:  # fmt: skip
    """One merged NS batch: ``entries`` are (sub, owner, offset), consecutive per sub.

    In eager mode on CUDA the whole batch (momentum kernels, NS products, update kernels) is replayed from a
    CUDA graph once it has run twice on the same tensors (``cuda_graphs.replays``): one launch instead of
    dozens, with the learning rate, weight decay and momentum read from device memory so that schedules
    change them without a new capture."""
    runs: list[tuple[_Sub, int, list[int], list[int]]] = []  # (sub, first row of the batch, owners, offsets)
    for i, (sub, o, k) in enumerate(entries):
        if not runs or runs[-1][0] is not sub:
            runs.append((sub, i, [], []))
        runs[-1][2].append(o)
        runs[-1][3].append(k)
    segments = []
    for sub, first, owners, offsets in runs:
        opts, r, c = sub.options, sub.rows, sub.cols
        g, b, p = (fused.Matrices(ts, owners, offsets, r, c) for ts in (sub.grads, sub.bufs, sub.params))
        scale = lr_scale(opts["adjust_lr"], opts["lr"], (r, c))
        segments.append(_Segment(sub, first, g, b, p, scale, 1 - opts["lr"] * opts["weight_decay"]))

    def rows_of(X: Tensor, seg: _Segment) -> Tensor:
        part = X[seg.first : seg.first + len(seg.params)]
        return part.mT if seg.sub.rows > seg.sub.cols else part

    def run(scalars: Tensor | None) -> None:
        """The batch; ``scalars``: per segment ``[scale, decay, 1 - momentum, momentum]`` on the device, or
        ``None`` for kernel arguments."""
        here = [None if scalars is None else scalars[4 * j : 4 * j + 4] for j in range(len(segments))]

        def fill(X: Tensor) -> None:
            for seg, s in zip(segments, here):
                opts = seg.sub.options
                fused.momentum_normalise(
                    seg.grads, seg.bufs, rows_of(X, seg), momentum=opts["momentum"], nesterov=opts["nesterov"],
                    norm_scale=seg.sub.norm_scale, eps=opts["eps"], scalars=s,
                )  # fmt: skip

        O = orthogonalize_filled(fill, (len(entries), m, n), schedule, work, device, method)
        for seg, s in zip(segments, here):
            part = rows_of(O, seg)
            fused.scaled_update(
                seg.params, part, scale=seg.scale, decay=seg.decay, update_dtype=seg.sub.buf_dtype, scalars=s
            )
            if seg.sub.options["stats"] is not None:
                _record_stats(seg.sub.options["stats"], part, seg.scale)

    if not cuda_graphs.graphable_on(device) or any(seg.sub.options["stats"] is not None for seg in segments):
        run(None)
        return
    slot = (device, cuda_graphs.stream_key(device), m, n, work, schedule, method, kernels.get_mode(), tuple(
        (seg.sub.rows, seg.sub.cols, seg.grads.dtype, seg.bufs.dtype, seg.params.dtype, seg.sub.buf_dtype,
         seg.sub.options["nesterov"], seg.sub.norm_scale, seg.sub.options["eps"], seg.decay != 1.0, len(seg.params))
        for seg in segments
    ))  # fmt: skip
    addresses = tuple(a for seg in segments for mats in (seg.grads, seg.bufs, seg.params) for a in mats.addresses())
    values = [v for seg in segments for mu in [seg.sub.options["momentum"]] for v in (seg.scale, seg.decay, 1 - mu, mu)]
    estimate = 4 * len(entries) * (m * n + m * m) * work.itemsize  # NS input, X, A, P and the next X
    ns_graph = filled_graph_key((len(entries), m, n), schedule, work, device, method)  # not needed once captured
    cuda_graphs.replays.run(slot, addresses, values, run, device, estimate, replaces=ns_graph)


def adamw_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step, in place; the same arithmetic as ``torch.optim.AdamW`` (decoupled weight decay)."""
    if not params:
        return
    for t in state_steps:
        t += 1
    # Bias corrections depend on the step count, which can differ between parameters that did not
    # always receive gradients: handle each step count as one multi-tensor batch.
    by_step: dict[float, list[int]] = defaultdict(list)
    for i, t in enumerate(state_steps):
        by_step[float(t)].append(i)  # steps live on the CPU: no device sync
    for step, idx in by_step.items():
        p = [params[i] for i in idx]
        g = [grads[i] for i in idx]
        m = [exp_avgs[i] for i in idx]
        v = [exp_avg_sqs[i] for i in idx]
        if weight_decay != 0:
            torch._foreach_mul_(p, 1 - lr * weight_decay)
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1 - beta2)
        step_size = lr / (1 - beta1**step)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(1 - beta2**step))
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p, m, denom, -step_size)
