"""The stages of a Muon step, each a small function on lists of tensors, and AdamW's step.

    momentum          buf <- buf.lerp(g, 1 - mu); u <- g.lerp(buf, mu) if nesterov else buf     momentum_update
    matrices          conv kernels flattened, stacks batched, split into row/column parts       parts.matrix_parts
    [precondition]    X -> X' per batch of matrices (a pipeline slot; default: none)            ns_jobs
    orthogonalize     same-shape matrices batched, O = orthogonalize(u) per batch               ns_jobs, ns_batches
    [postscale]       O -> O' per batch (a pipeline slot; default: none)                        ns_jobs
    lr scale          O * lr_scale(adjust_lr, lr, (rows, cols))                                ns_jobs (lr_scale)
    weight update     p <- p (1 - lr wd) - update (a pipeline slot; default: decoupled)         pipeline

``reference.muon_reference_step`` is the plain-loop reference every path is tested against; ``functional`` runs
these stages (the torch path) or hands the step to the fused CUDA plans (``plans``), which compute the same stages
in fewer passes. AdamW (Loshchilov & Hutter 2019) is written to match torch.optim.AdamW step for step.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import torch
from torch import Tensor

from ..coefficients import as_preset
from ..newton_schulz import (
    NSCall,
    default_ns_dtype,
    orthogonalize,
    orthogonalize_stack,
)
from .options import ADJUST_LR_MODES, NS_OPTIONS
from .parts import SplitSpec, matrix_parts, row_state_parts
from .pipeline import SLOTS, get_stage

__all__ = [
    "AdjustLR",
    "Executor",
    "Job",
    "StepCall",
    "adamw_step",
    "all_finite",
    "finite_on_device",
    "is_packed",
    "lr_scale",
    "momentum_update",
    "ns_batches",
    "ns_flops",
    "ns_jobs",
    "pack_counts",
    "run_all",
]

AdjustLR = str | float | None | Callable[[float, tuple[int, int]], float]


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
    adjust_lr: AdjustLR,
    ns: Mapping[str, Any] = NS_OPTIONS,
    parts: int = 1,
    stats: dict[str, list[Tensor]] | None = None,
    report_lr: tuple[float, AdjustLR] | None = None,
    states: Sequence[Tensor] | None = None,
) -> list[Job]:
    """The batched orthogonalizations that write ``lr_scale(adjust_lr, lr, shape) * postscale(orthogonalize(
    precondition(u)))`` into ``outputs`` (one output per update, same shape, any floating dtype), as jobs for an
    executor. ``ns``: the orthogonalization's options (``options.NS_OPTIONS``: coefficients, ns_steps, eps,
    ns_dtype, method, restarts, matrix_view, split, max_batch, and the stage names of the ``precondition`` and
    ``postscale`` slots); those it lacks take their defaults.

    Matrices of the same shape, dtype and device (after flattening and splitting) are stacked into calls of
    at most ``max_batch`` (``None``: all, cut into ``parts`` pieces so that a distributed executor can
    balance few shapes). ``report_lr = (lr, adjust_lr)`` is what the statistics' update RMS uses when the
    outputs are written unscaled (``lr=1, adjust_lr=None``) and scaled later. ``states``: per update, the state of
    a ``rows_state`` postscale stage (``pipeline.row_state_shape``), updated in place; a job's outputs include
    its pieces, so that an executor that exchanges outputs keeps the state equal on every rank.
    """
    o = {**NS_OPTIONS, **ns}
    method, eps, restarts, view, split = o["method"], o["eps"], o["restarts"], o["matrix_view"], o["split"]
    pre, post = get_stage("precondition", o["precondition"]), get_stage("postscale", o["postscale"])
    if post.rows_state and (states is None or len(states) != len(updates)):
        raise ValueError(
            f"postscale stage {post.name!r} keeps state per matrix row: pass one state tensor per update "
            "(muon_step's stage_states; Muon keeps them)"
        )
    batches: dict[tuple, list[tuple[Tensor, Tensor, Tensor | None]]] = defaultdict(list)
    for k, (u, out) in enumerate(zip(updates, outputs)):
        kept = row_state_parts(states[k], split) if post.rows_state else repeat(None)  # type: ignore[index]
        for src, dst, st in zip(matrix_parts(u, view, split), matrix_parts(out, view, split), kept):
            batches[(tuple(src.shape), src.dtype, src.device)].append((src, dst, st))

    preset = as_preset(o["coefficients"])
    rows = preset.schedule(o["ns_steps"])

    def job(pairs: list[tuple[Tensor, Tensor, Tensor | None]], shape: tuple, work: torch.dtype, scale: float,
            rms: float) -> None:  # fmt: skip
        srcs = [src for src, _, _ in pairs]
        if srcs[0].numel() == 0:  # empty matrices: nothing to orthogonalize, a zero update
            for _, dst, _ in pairs:
                dst.zero_()
            return
        if pre.name != SLOTS["precondition"]:
            srcs = list(pre.fast(torch.stack(srcs).reshape(-1, *shape[-2:])).reshape(len(srcs), *shape).unbind(0))
        if method == "svd":
            ortho = orthogonalize(torch.stack(srcs), method="svd")
        elif pre.normalises:  # spectral norm <= 1 already: NS takes it as it is (wide, in the NS precision)
            X = torch.stack(srcs).reshape(-1, *shape[-2:])
            tall = X.shape[-2] > X.shape[-1]
            X = (X.mT if tall else X).to(work).contiguous()
            ortho = NSCall.prenormalised_call(rows, work, method, restarts).run(X, fresh=True)
            ortho = (ortho.mT if tall else ortho).reshape(len(srcs), *shape)
        else:  # possibly a CUDA graph's static output: consumed below
            ortho = orthogonalize_stack(srcs, NSCall.of(rows, preset.norm_scale, eps, work, method, restarts))
            ortho = ortho.reshape(len(srcs), *srcs[0].shape)  # "batch" views have leading dims
        if post.rows_state:
            kept = [st for _, _, st in pairs]
            S = torch.stack(kept)  # type: ignore[arg-type]
            ortho = post.fast(ortho.reshape(-1, *shape[-2:]), S.view(-1, shape[-2], 1)).reshape(len(srcs), *shape)
            torch._foreach_copy_(kept, list(S.unbind(0)))  # type: ignore[arg-type]
        elif post.name != SLOTS["postscale"]:
            ortho = post.fast(ortho.reshape(-1, *shape[-2:])).reshape(len(srcs), *shape)
        for (_, dst, _), o in zip(pairs, ortho.unbind(0)):
            torch.mul(o, scale, out=dst)  # scale and cast in one pass
        if stats is not None:
            _record_stats(stats, ortho.reshape(-1, *shape[-2:]), rms)

    jobs: list[Job] = []
    for (shape, dtype, device), all_pairs in batches.items():
        scale = lr_scale(adjust_lr, lr, shape[-2:])
        rms = scale if report_lr is None else lr_scale(report_lr[1], report_lr[0], shape[-2:])
        work = o["ns_dtype"] or default_ns_dtype(device, dtype)
        chunk = o["max_batch"] or math.ceil(len(all_pairs) / parts)
        per_matrix = ns_flops(shape)
        for start in range(0, len(all_pairs), chunk):
            pairs = all_pairs[start : start + chunk]
            jobs.append(
                Job(
                    cost=float(per_matrix * len(pairs)),
                    run=functools.partial(job, pairs, shape, work, scale, rms),
                    outputs=[dst for _, dst, _ in pairs] + [st for _, _, st in pairs if st is not None],
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
    ns = dict(coefficients="jordan", ns_steps=1, eps=0.0, matrix_view=matrix_view, split=split, max_batch=max_batch)
    jobs = ns_jobs(metas, metas, lr=1.0, adjust_lr=None, ns=ns, parts=parts)
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
    top = _top_singular_value(O)
    bottom = _bottom_singular_value(O, top)
    stats.setdefault("sigma_max", []).append(top.max())
    stats.setdefault("sigma_min", []).append(bottom.min())
    stats.setdefault("epsilon", []).append(torch.maximum(top - 1, 1 - bottom).max())


def summarise_stats(stats: dict[int, dict[str, list[Tensor]]], groups: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``Muon.stats()``: per group index of ``stats`` (what ``_record_stats`` appended), each statistic's worst
    value as a float (one host sync), ``chi`` from ``epsilon``, and the group's lr and largest shape-adjusted lr."""
    out: dict[str, float] = {}
    for gi, values in stats.items():
        group = groups[gi]
        for key, tensors in values.items():
            if tensors:
                stacked = torch.stack([t.float().cpu() for t in tensors])
                out[f"group{gi}/{key}"] = float(stacked.min() if key == "sigma_min" else stacked.max())
        if values.get("epsilon"):
            eps = out[f"group{gi}/epsilon"]
            out[f"group{gi}/chi"] = 1 / (1 - eps) if eps < 1 else float("inf")
        shapes = [
            (int(part.shape[-2]), int(part.shape[-1]))
            for p in group["params"]
            for part in matrix_parts(torch.empty(p.shape, device="meta"), group["matrix_view"], group["split"])
        ]
        out[f"group{gi}/lr"] = float(group["lr"])
        out[f"group{gi}/lr_max"] = max((lr_scale(group["adjust_lr"], group["lr"], s) for s in shapes), default=0.0)
    return out


def _top_singular_value(O: Tensor, iters: int = 30) -> Tensor:
    """Power-iteration estimate (from below) of each matrix's largest singular value; no host sync."""
    v = torch.ones((*O.shape[:-2], O.shape[-1], 1), dtype=O.dtype, device=O.device)
    for _ in range(iters):
        v = O.mT @ (O @ v)
        v = v / v.norm(dim=-2, keepdim=True).clamp_min(1e-30)
    return (O @ v).norm(dim=(-2, -1))


def _bottom_singular_value(O: Tensor, top: Tensor, iters: int = 30) -> Tensor:
    """Power-iteration estimate (from above) of each matrix's smallest singular value, ``O`` of shape ``(b, k, n)``
    with ``k <= n``: the largest eigenvalue of ``c I - O O^T`` is ``c - sigma_min^2`` for ``c >= sigma_max^2``
    (``top``: ``_top_singular_value``). No host sync. Null directions count: a rank-deficient ``O`` gives 0."""
    gram = O @ O.mT
    c = (top.square() * 1.01 + 1e-30).view(-1, 1, 1)
    shifted = c * torch.eye(gram.shape[-1], dtype=O.dtype, device=O.device) - gram
    v = torch.ones((*O.shape[:-2], O.shape[-2], 1), dtype=O.dtype, device=O.device)
    for _ in range(iters):
        v = shifted @ v
        v = v / v.norm(dim=-2, keepdim=True).clamp_min(1e-30)
    lam = (v.mT @ shifted @ v).view(-1)
    return (c.view(-1) - lam).clamp_min(0).sqrt()


def ns_flops(shape: Sequence[int], steps: int = 1) -> int:
    """FLOPs of ``steps`` standard quintic NS steps on a (batch of) matrix of ``shape``: 4 m^2 n + 2 m^3, m <= n."""
    m, n = sorted(shape[-2:])
    return (4 * m * m * n + 2 * m**3) * math.prod(shape[:-2]) * steps


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
    fused: bool = False,
    found_inf: Tensor | None = None,
    counts: Tensor | None = None,
) -> None:
    """One AdamW step, in place; the same arithmetic as ``torch.optim.AdamW`` (decoupled weight decay): its foreach
    form, or with ``fused`` (tensors that ``fused_adamw_applies`` takes) its fused kernel, which changes nothing
    where ``found_inf`` (a float32 one-element tensor on their device) holds a nonzero value. The step counts
    (one-element CPU tensors) advance either way: in one call where they are the entries of ``counts`` in order
    (``pack_counts``), else in one multi-tensor call."""
    if not params:
        return
    if counts is not None and is_packed(counts, state_steps):
        counts.add_(1)  # 53 counts: 6 us against 0.19 ms for the multi-tensor call (2-core AMD EPYC)
        values = counts.tolist()
    else:
        torch._foreach_add_(list(state_steps), 1)  # one call (53 counts: 0.19 ms against 0.35 ms in a loop)
        values = [float(t) for t in state_steps]  # CPU steps: no device sync
    # Bias corrections depend on the step count, which can differ between parameters that did not
    # always receive gradients: handle each step count as one multi-tensor batch.
    by_step: dict[tuple[float, torch.dtype], list[int]] = defaultdict(list)
    for i, step in enumerate(values):  # the fused kernel takes one dtype per call
        by_step[(step, params[i].dtype if fused else torch.float32)].append(i)
    for (step, _), idx in by_step.items():
        p = [params[i] for i in idx]
        g = [grads[i] for i in idx]
        m = [exp_avgs[i] for i in idx]
        v = [exp_avg_sqs[i] for i in idx]
        if fused:  # the kernel reads the step count from its device: a fill, no copy from the host
            count = torch.full((), step, dtype=torch.float32, device=p[0].device)
            torch._fused_adamw_(
                p, g, m, v, [], [count] * len(p), lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                eps=eps, amsgrad=False, maximize=False, grad_scale=None, found_inf=found_inf,
            )  # fmt: skip
            continue
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


def pack_counts(states: Sequence[dict[str, Any]]) -> Tensor | None:
    """Make the AdamW step counts of ``states`` (one-element CPU tensors of one dtype) the entries of one tensor,
    in order, each state then holding a view of its entry (same values; a state dict saves and loads them as
    before); that tensor, or ``None`` where they are not such counts. ``adamw_step(..., counts=)`` then advances
    them in one call."""
    steps = [state.get("step") for state in states]
    if not steps or not all(isinstance(t, Tensor) and t.dim() == 0 and t.device.type == "cpu" for t in steps):
        return None
    if len({t.dtype for t in steps}) != 1:  # type: ignore[union-attr]
        return None
    counts = torch.stack(steps)  # type: ignore[arg-type]
    for i, state in enumerate(states):
        state["step"] = counts[i]
    return counts


def is_packed(counts: Tensor, steps: Sequence[Tensor]) -> bool:
    """Whether ``steps`` are the entries of ``counts`` in order (``pack_counts``) still: a state replaced by
    ``load_state_dict`` or by hand is not."""
    if len(steps) != counts.numel():
        return False
    return all(t._base is counts and t.storage_offset() == i for i, t in enumerate(steps))


def fused_adamw_applies(params: Sequence[Tensor], grads: Sequence[Tensor]) -> bool:
    """Whether ``adamw_step(..., fused=True)`` takes these: all on one CUDA device, dense, each gradient of its
    parameter's floating dtype (the state is made like the parameter)."""
    if not params or not params[0].is_cuda:
        return False
    device = params[0].device
    return all(
        p.device == device and g.device == device and p.dtype == g.dtype and p.dtype.is_floating_point
        and p.layout == g.layout == torch.strided
        for p, g in zip(params, grads)
    )  # fmt: skip


def finite_on_device(tensors: list[Tensor], device: torch.device) -> Tensor:
    """One bool per tensor (all on ``device``), on that device, no host sync: no NaN/Inf in it. The largest |x| of
    every tensor in one multi-tensor kernel per dtype (an inf-norm cannot overflow the way a 2-norm of 1e30 would);
    an empty tensor is finite (and has no max)."""
    nonempty = [t for t in tensors if t.numel()]
    peaks = list(torch._foreach_norm(nonempty, float("inf"))) if nonempty else []
    if len(nonempty) < len(tensors):
        it, zero = iter(peaks), torch.zeros((), device=device)
        peaks = [next(it) if t.numel() else zero for t in tensors]
    return torch.stack(peaks).isfinite()


def all_finite(tensors: list[Tensor]) -> Tensor:
    """One bool per tensor (on the CPU): no NaN/Inf in it (``finite_on_device`` per device), one sync."""
    flags = torch.ones(len(tensors), dtype=torch.bool)
    by_device: dict[Any, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for device, index in by_device.items():
        flags[index] = finite_on_device([tensors[i] for i in index], device).cpu()
    return flags
