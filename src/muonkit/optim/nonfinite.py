"""What a NaN or Inf gradient does to a ``Muon`` step (its ``nonfinite`` policy): raised as ``NonFiniteGradientError``
naming the parameters, or the whole step skipped and counted; either way the step changes nothing.

Two ways to find out, with the same outcome for the parameters and the state:

- **Before the step, on the host** (the first steps, CPU parameters, sharded or executor-driven steps, the torch
  path): one multi-tensor pass (``stages.all_finite``) and one host sync, agreed across ranks where parameters or
  work are spread over them; a bad step is refused before anything changes.
- **On the device, without a sync** (a repeated fused step on one CUDA device, ``repeat.step_again``: the step a
  training loop takes from its second iteration on): one Triton kernel per gradient dtype, replayed from a CUDA
  graph (``accel.finite.FiniteScan``; the multi-tensor pass where it cannot read the gradients), writes a
  per-device flag (``found_inf_flag``), which the fused kernels and CUDA-graph replays read and, where it is set,
  store nothing (``accel.fused``); the AdamW groups take torch's fused AdamW with that flag as its ``found_inf``.
  The flag's value travels to pinned host memory behind an event, and is read when the next ``step()`` starts (or
  ``nonfinite_skips`` or ``state_dict()`` is read): a skipped step is then counted, or ``NonFiniteGradientError``
  raised from that next ``step()`` before it changes anything (the per-chunk or per-gradient results that name the
  parameters are copied from the device only then).

Measured on an H200 (GPT 12 x 768, a real loop, paired against ``nonfinite="ignore"``): the host sync of the first
form cost 5.4% of each iteration (``benchmarks/results/train_loop_paired_large_method_nonfinite_h200.json``), the
second nothing measurable (median +0.17 ms of about 32 ms,
``train_loop_paired_large_nonfinite_device_check_h200.json``); the multi-tensor pass's host work (1.1 ms a step,
before the first graph launch, profiled) was what ``FiniteScan`` removed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from ..accel import fused
from .shards import any_rank, locals_of
from .stages import all_finite, finite_on_device

if TYPE_CHECKING:
    from .muon import Muon

__all__ = [
    "NONFINITE_POLICIES",
    "NonFiniteGradientError",
    "defer",
    "device_check",
    "device_flag",
    "found_inf_flag",
    "nonfinite_names",
    "nonfinite_skip",
    "settle",
]

NONFINITE_POLICIES = ("raise", "skip", "ignore")
Gathered = list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]  # per group: (group, params, grads) that step


class NonFiniteGradientError(FloatingPointError):
    """A gradient held NaN or Inf and the optimizer's ``nonfinite`` policy is ``"raise"``."""


_FLAGS: dict[torch.device, Tensor] = {}


def found_inf_flag(device: torch.device) -> Tensor:
    """The float32 one-element flag of ``device`` that fused steps read (nonzero: store nothing). One per device
    for the life of the process: CUDA graphs capture its address."""
    flag = _FLAGS.get(device)
    if flag is None:
        flag = _FLAGS[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return flag


def device_flag(opt: Muon, grads: list[Tensor]) -> Tensor | None:
    """The ``found_inf`` flag the fused kernels of ``opt``'s checked step over ``grads`` read (``found_inf_flag``),
    where they all lie on one CUDA device with acceleration on, no executor and no sharded parameter; else
    ``None`` (the check stays on the host)."""
    if opt.executor is not None or not fused.fused_enabled() or not grads:
        return None
    device = grads[0].device
    if device.type != "cuda" or torch.compiler.is_compiling() or opt._has_sharded():
        return None
    if any(g.device != device for g in grads):
        return None
    return found_inf_flag(device)


def device_check(grads: list[Tensor], flag: Tensor) -> Tensor:
    """Per gradient, whether it is finite (a bool tensor on ``flag``'s device, no host sync), and ``flag`` set to
    1 where any is not, else 0 (``stages.finite_on_device``)."""
    finite = finite_on_device(grads, flag.device)
    flag.copy_(finite.all().logical_not().view(1))
    return finite


class _Pending(NamedTuple):
    """A step checked on the device, not yet read on the host."""

    flag: Any  # the step's ``found_inf`` value: a one-element numpy view of pinned host memory, written once
    # ``event`` has passed
    finite: Tensor  # per gradient (or per chunk of ``owners``): read only where the flag was set
    event: Any  # torch.cuda.Event recorded after the copy (None: the copy was synchronous)
    names: list[tuple[int, int]]  # per gradient: (group index, parameter index), for the error's names
    steps: list[Tensor]  # the AdamW step counters the step advanced on the host (put back if it changed nothing)
    owners: list[int] | None = None  # per entry of ``finite``, its gradient (``FiniteScan.owners``); None: itself


def defer(opt: Muon, flag: Tensor, finite: Tensor, names: list[tuple[int, int]], steps: list[Tensor],
          owners: list[int] | None = None) -> None:  # fmt: skip
    """Start reading the step's ``flag`` (``found_inf_flag``, as the step's check left it) to the host without
    waiting; ``settle`` reads it, and ``finite`` (``device_check``'s result, or ``FiniteScan.run``'s with its
    ``owners``) where it was set. One pinned float and one event per optimizer, reused every step: the next step
    settles this one before it defers its own."""
    host = opt._finite_host
    if host is None or host[0] != flag.device:
        pinned = torch.empty(1, dtype=torch.float32, pin_memory=flag.is_cuda)
        event = torch.cuda.Event() if flag.is_cuda else None
        host = opt._finite_host = (flag.device, pinned, pinned.numpy(), event)
    _, pinned, view, event = host
    pinned.copy_(flag, non_blocking=True)
    if event is not None:
        event.record()
    opt._nonfinite_pending = _Pending(view, finite, event, names, steps, owners)


def settle(opt: Muon) -> None:
    """Act on a step checked on the device (``defer``), if one is pending: nothing where its gradients were
    finite (the common case reads one float, with no torch call); else the AdamW step counters it advanced are
    put back and the step is counted in ``nonfinite_skips`` (policy ``"skip"``) or a ``NonFiniteGradientError``
    is kept for the next ``step()`` to raise (``"raise"``). Waits for that step's kernels (not for later work)
    where they have not finished."""
    pending = opt._nonfinite_pending
    if pending is None:
        return
    opt._nonfinite_pending = None
    if pending.event is not None:
        pending.event.synchronize()
    if not pending.flag[0]:
        return
    for t in pending.steps:
        t -= 1
    if opt.nonfinite == "skip":
        opt._nonfinite_skips += 1
        return
    finite = pending.finite.tolist()  # a host sync, on this rare path only
    if pending.owners is not None:  # per chunk: a gradient is finite where all its chunks are
        chunks, finite = finite, [True] * len(pending.names)
        for owner, ok in zip(pending.owners, chunks):
            finite[owner] = finite[owner] and bool(ok)
    bad = [opt._param_name(opt.param_groups[gi], gi, i) for ok, (gi, i) in zip(finite, pending.names) if not ok]
    what = (
        "The step that received them was skipped on the GPU (it changed no parameter or state); this error comes "
        "from the step() after it, before that step changed anything."
    )
    opt._nonfinite_error = NonFiniteGradientError(_message(bad, what))


def _message(bad: list[str], what: str) -> str:
    return (
        f"non-finite (NaN/Inf) gradient in {len(bad)} parameter(s): {', '.join(bad[:5])}"
        f"{' ...' if len(bad) > 5 else ''}. {what} Pass nonfinite='skip' to skip such steps, or clip/scale the "
        "loss (e.g. GradScaler)."
    )


def nonfinite_names(opt: Muon, gathered: Gathered, flag: Tensor | None = None) -> list[str]:
    """The names of the parameters whose gradients are not finite (one host sync). With ``flag``
    (``found_inf_flag`` of the gradients' one CUDA device), the check also sets it, for the step's fused kernels."""
    grads = [g for _, _, gs in gathered for g in gs]
    if not grads:
        return []
    # one host sync either way
    finite = all_finite(locals_of(grads)) if flag is None else device_check(grads, flag).cpu()
    if bool(finite.all()):
        return []
    names = []
    flags = iter(finite.tolist())
    for gi, (group, params, _) in enumerate(gathered):
        index = {id(p): i for i, p in enumerate(group["params"])}
        for p in params:
            if not next(flags):
                names.append(opt._param_name(group, gi, index[id(p)]))
    return names


def nonfinite_skip(opt: Muon, gathered: Gathered, flag: Tensor | None = None) -> bool:
    """Whether ``opt`` skips this step for a non-finite gradient (policy ``"skip"``; counted in
    ``nonfinite_skips``); under ``"raise"`` raises ``NonFiniteGradientError`` instead. Nothing has changed yet.
    ``flag``: see ``nonfinite_names``."""
    bad = nonfinite_names(opt, gathered, flag)
    agree = getattr(opt.executor, "any_rank", None)
    if agree is None and opt._has_sharded():
        agree = any_rank  # every rank holding shards must take the same decision
    if agree is not None and agree(bool(bad)) and not bad:
        bad = ["(a parameter on another rank)"]  # every rank must take the same decision
    if not bad:
        return False
    if opt.nonfinite == "skip":
        opt._nonfinite_skips += 1
        return True
    raise NonFiniteGradientError(_message(bad, "No parameter or state was changed."))
