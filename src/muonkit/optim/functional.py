"""The functional Muon step (no optimizer state objects, just lists of tensors): ``muon_step`` for one set of
hyper-parameters, ``muon_steps`` for several (e.g. one per parameter group) sharing NS batches.

Muon (Jordan 2024; torch.optim.Muon conventions), stage by stage (``stages``):

    buf    <- buf + (1 - mu) (g - buf)                 # buf.lerp_(g, 1 - mu)
    u      <- g + mu (buf - g)   if nesterov else buf  # g.lerp(buf, mu)
    O      <- orthogonalize(view(u))                   # conv: (out, in*k*k); fused: split rows
    p      <- p (1 - lr wd) - lr * s(rows, cols) * O   # decoupled weight decay, shape-aware scale s

On CUDA, where the fused kernels apply, the step runs through a plan (``plans``); elsewhere through torch ops.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..accel import fused
from ..accel import guards as _guards
from ..coefficients import CoefficientSpec
from ..newton_schulz import (
    Restarts,
    default_ns_dtype,
)
from .options import NS_OPTIONS, as_numbers, holds_tensors
from .parts import SplitSpec, split_axes
from .pipeline import SLOTS, fused_stages, get_stage
from .plans import _fused_muon_steps, _streams
from .remembered import _remember, _Remembered, _remembered_plan, _state_key
from .stages import (
    AdjustLR,
    Executor,
    StepCall,
    momentum_update,
    ns_jobs,
    run_all,
)

__all__ = ["muon_step", "muon_steps"]


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
    method: str = "auto",
    restarts: Restarts = None,
    matrix_view: str = "flatten",
    split: SplitSpec = None,
    max_batch: int | None = None,
    precondition: str = SLOTS["precondition"],
    postscale: str = SLOTS["postscale"],
    update: str = SLOTS["update"],
    executor: Executor | None = None,
    stats: dict[str, list[Tensor]] | None = None,
    stage_states: Sequence[Tensor] | None = None,
) -> None:
    """One Muon step, in place, for parameters that share one set of hyper-parameters.

    ``precondition``, ``postscale``, ``update``: the stages of those pipeline slots, by name (``pipeline``).
    ``stage_states``: per parameter, the state of a postscale stage that keeps one (``rows_state``, e.g.
    ``"normuon"``), float32 zeros of ``parts.row_state_shape(p.shape, matrix_view, split)`` at the start, updated in
    place.

    With ``stats`` (a dict), each job appends device tensors, no host sync: ``"orth_error"`` the largest
    ``||O O^T - I||_F / sqrt(min(m, n))`` of its NS outputs (0 for an exact polar factor of full rank),
    ``"update_rms"`` the RMS of its scaled updates and ``"sigma_max"`` a power-iteration estimate of the
    largest singular value of its NS outputs (1 for an exact polar factor; a preset's band edge otherwise).

    Matrices of the same shape, dtype and device (after flattening and splitting) are orthogonalized
    together in batched ``orthogonalize`` calls of at most ``max_batch`` matrices (``None``: all), which
    caps the extra memory the stacked copies take. Each call is a *job*; ``executor(jobs)`` runs them
    (default: all here; ``muonkit.distributed`` spreads them over ranks and exchanges the results).
    """
    options = {k: v for k, v in locals().items() if k not in ("params", "grads", "momentum_buffers")}
    _muon_steps([(params, grads, momentum_buffers, options)])


def _torch_muon_step(
    params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor], opts: dict[str, Any]
) -> None:
    """``muon_step`` through torch ops (any device and dtype; NS jobs run by ``opts["executor"]``)."""
    updates = momentum_update(grads, momentum_buffers, opts["momentum"], opts["nesterov"])
    # One contiguous output per parameter (so the reshaped/split views alias it, whatever the
    # parameter's memory format), filled part by part from batched NS results.
    outputs = [torch.empty(u.shape, dtype=u.dtype, device=u.device) for u in updates]
    executor = opts["executor"]
    ns = {k: opts[k] for k in NS_OPTIONS}
    parts = getattr(executor, "parts", 1)
    jobs = ns_jobs(
        updates, outputs, lr=opts["lr"], adjust_lr=opts["adjust_lr"], ns=ns, parts=parts, stats=opts["stats"],
        states=opts["stage_states"],
    )  # fmt: skip
    (executor or run_all)(jobs)
    get_stage("update", opts["update"]).fast(params, outputs, opts["lr"], opts["weight_decay"])


# muon_step's optional arguments and their defaults, for the calls of muon_steps that leave them out
_STEP_DEFAULTS: dict[str, Any] = {
    name: p.default for name, p in inspect.signature(muon_step).parameters.items() if p.default is not p.empty
}


def muon_steps(calls: Sequence[StepCall]) -> None:
    """``muon_step(params, grads, momentum_buffers, **options)`` for every ``(params, grads, momentum_buffers,
    options)`` of ``calls`` (e.g. one per parameter group), the same result as calling them one by one.

    Where the fused CUDA path takes several calls, their same-shape matrices share NS batches: a QKV group's
    768 x 768 parts and another group's 768 x 768 matrices become one batch, and so do ``3072 x 768`` and
    ``768 x 3072`` matrices (NS works on the transpose of the first). Fewer, larger batches keep the GPU
    busier (measured on an H100 for GPT-2 small's four NS batches merged into two:
    ``benchmarks/dev/results/batch_merge_h100.json``).

    When every call takes the fused path, the step's plan is remembered with a guard over its tensors' metadata
    (``_guards``); a later step whose options and tensors match runs the plan without checking each tensor
    again in Python (``_remembered_plan``).
    """
    _muon_steps(calls)


def _muon_steps(calls: Sequence[StepCall], found_inf: Tensor | None = None) -> _Remembered | None:
    """``muon_steps``; returns the remembered plan the step ran or made (``None`` where none applies), which a
    caller that knows the next step's structure is the same may run again (``Muon._step_again``).
    ``found_inf``: the flag the fused kernels read (``plans._StepPlan.run``); the torch path ignores it (its
    caller checked the gradients before)."""
    full = [(params, grads, bufs, as_numbers({**_STEP_DEFAULTS, **options})) for params, grads, bufs, options in calls
            if params]  # fmt: skip
    if not full:
        return None
    streams = _streams(full)
    # what besides tensor metadata a remembered plan depends on; None: no plan is remembered or looked up
    state = None if torch.compiler.is_compiling() or not _guards.available() else _state_key(full, streams)
    if state is not None:
        entry = _remembered_plan(full, state)
        if entry is not None:
            entry.plan.run(full, streams, found_inf)
            return entry
    fused_calls = []
    for params, grads, bufs, opts in full:
        if (
            opts["executor"] is None
            and opts["method"] != "svd"
            and not holds_tensors(opts)
            and fused_stages(opts)
            and split_axes(opts["split"])[1] is None  # the fused kernels address row-contiguous matrices only
            and _fused_step_applies(params, grads, bufs, opts["ns_dtype"])
        ):
            fused_calls.append((params, grads, bufs, opts))
        else:
            _torch_muon_step(params, grads, bufs, opts)
    if fused_calls:
        plan = _fused_muon_steps(fused_calls, streams, found_inf)
        if state is not None and len(fused_calls) == len(full):
            return _remember(full, state, plan)
    return None


def _fused_step_applies(
    params: Sequence[Tensor], grads: Sequence[Tensor], bufs: Sequence[Tensor], ns_dtype: torch.dtype | None
) -> bool:
    """Whether ``muon_step`` can take the fused CUDA kernels (``muonkit.accel.fused``) for these tensors."""
    if not params[0].is_cuda:
        return False
    work = ns_dtype or default_ns_dtype(params[0].device, bufs[0].dtype)
    tensors = [*params, *grads, *bufs]
    return all(p.shape == g.shape == b.shape for p, g, b in zip(params, grads, bufs)) and fused.applies(tensors, work)
