"""The Muon step as a pipeline of named stages, and the registry a variant adds its stage to.

    momentum -> [precondition] -> orthogonalize -> [postscale] -> update

``momentum`` (``stages.momentum_update``) and ``orthogonalize`` (``stages.ns_jobs``) are the same in every Muon;
the other three are *slots* that a parameter group fills by name (``Muon(..., postscale="name")``, also per
group), so that a variant of the update rule is one ``Stage`` registered here, with its reference beside it, and
every step path (the class, ``muon_step``, the DDP executor, FSDP2/DTensor and ZeRO-1) runs it:

    slot           runs on                                          default
    precondition   each batch of matrices before NS, ``X -> X'``     "none": ``X``
    postscale      each batch of NS outputs, ``O -> O'``            "none": ``O``
    update         the parameters, ``(params, updates, lr, wd)``     "decoupled": ``p <- p (1 - lr wd) - update``

A matrix stage sees matrices as the parameter has them (rows = output features, after conv flattening and the
``split`` of fused rows), in a batch ``(b, rows, cols)`` of the update's dtype; the lr scale of ``adjust_lr`` is
applied after ``postscale``. Its reference takes one ``(rows, cols)`` float64 matrix. An update stage's
``fast(params, updates, lr, weight_decay)`` steps lists of tensors in place (``updates`` already carry their lr);
its reference steps one tensor. Only the defaults have a fused CUDA form: a group with another stage takes the
torch path (``functional``), whose speed the stage's own code decides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["SLOTS", "Stage", "apply_update", "cautious_update", "get_stage", "register", "stage_names", "unregister"]


@dataclass(frozen=True)
class Stage:
    """One named stage of a slot: ``fast`` (batched, what the step runs), ``reference`` (one matrix or tensor,
    plain, what tests compare ``fast`` with), ``source`` (where the rule comes from) and ``fused`` (the fused
    CUDA step computes it too; only the defaults)."""

    slot: str
    name: str
    fast: Callable[..., Any]
    reference: Callable[..., Any]
    source: str
    fused: bool = False


def _same(X: Tensor) -> Tensor:
    return X


def apply_update(params: Sequence[Tensor], updates: Sequence[Tensor], lr: float, weight_decay: float) -> None:
    """``p <- p (1 - lr wd) - update`` for every parameter (the update already carries its lr)."""
    if weight_decay != 0:
        torch._foreach_mul_(list(params), 1 - lr * weight_decay)
    torch._foreach_sub_(list(params), [u.to(p.dtype) for u, p in zip(updates, params)])


def _decoupled_reference(p: Tensor, update: Tensor, lr: float, weight_decay: float) -> None:
    p.mul_(1 - lr * weight_decay)
    p.sub_(update.to(p.dtype))


_DEFAULTS = (
    Stage("precondition", "none", _same, _same, "no pre-conditioning: NS takes the momentum as it is", fused=True),
    Stage("postscale", "none", _same, _same, "no post-scaling: the NS output is the update", fused=True),
    Stage(
        "update",
        "decoupled",
        apply_update,
        _decoupled_reference,
        "decoupled weight decay (Loshchilov & Hutter 2019), as torch.optim.Muon",
        fused=True,
    ),
)


def cautious_update(params: Sequence[Tensor], updates: Sequence[Tensor], lr: float, weight_decay: float) -> None:
    """Cautious weight decay: ``p <- p - lr wd [u p >= 0] p - u``, the decay only on the entries where the update
    ``u`` and the weight have the same sign (or either is 0)."""
    ups = [u.to(p.dtype) for u, p in zip(updates, params)]  # may be the caller's tensors: not changed in place
    if weight_decay != 0:
        kept = [torch.where(u * p >= 0, p, torch.zeros_like(p)) for u, p in zip(ups, params)]
        ups = list(torch._foreach_add(ups, kept, alpha=lr * weight_decay))
    torch._foreach_sub_(list(params), ups)


def _cautious_reference(p: Tensor, update: Tensor, lr: float, weight_decay: float) -> None:
    flat, u = p.view(-1), update.to(p.dtype).reshape(-1)
    for i in range(flat.numel()):
        x, step = float(flat[i]), float(u[i])
        flat[i] = x - (lr * weight_decay * x if step * x >= 0 else 0.0) - step


_BUILT_IN = (
    Stage(
        "update",
        "cautious",
        cautious_update,
        _cautious_reference,
        "Cautious Weight Decay (Chen et al. 2025, arXiv 2510.12402, Algorithm 1): "
        "x <- x - lr (u + wd [u x >= 0] x), entrywise; no new hyper-parameter",
    ),
)
SLOTS: dict[str, str] = {s.slot: s.name for s in _DEFAULTS}  # slot -> its default stage's name
_REGISTRY: dict[str, dict[str, Stage]] = {s.slot: {s.name: s} for s in _DEFAULTS}
for _stage in _BUILT_IN:
    _REGISTRY[_stage.slot][_stage.name] = _stage


def register(stage: Stage) -> Stage:
    """Make ``stage`` selectable by name in its slot (a group option of that name). A name already taken in the
    slot is refused: a changed rule gets a new name, so a saved ``state_dict`` never changes meaning."""
    if stage.slot not in SLOTS:
        raise ValueError(f"unknown slot {stage.slot!r}; the slots are {tuple(SLOTS)}")
    if not (isinstance(stage.name, str) and stage.name):
        raise ValueError(f"a stage's name must be a non-empty string, got {stage.name!r}")
    if stage.name in _REGISTRY[stage.slot]:
        raise ValueError(f"{stage.slot} stage {stage.name!r} is already registered")
    _REGISTRY[stage.slot][stage.name] = stage
    return stage


def unregister(slot: str, name: str) -> None:
    """Remove a registered stage (the defaults stay)."""
    if name == SLOTS.get(slot):
        raise ValueError(f"the default {slot} stage {name!r} cannot be removed")
    del _REGISTRY[slot][name]


def stage_names(slot: str) -> tuple[str, ...]:
    """The names a group may give the option ``slot``."""
    return tuple(_REGISTRY[slot])


def get_stage(slot: str, name: Any) -> Stage:
    """The stage ``name`` of ``slot``; ``ValueError`` naming the choices where there is none."""
    try:
        return _REGISTRY[slot][name]
    except (KeyError, TypeError):
        raise ValueError(f"{slot} must be one of {stage_names(slot)}, got {name!r}") from None


def fused_stages(opts: dict[str, Any]) -> bool:
    """Whether every stage a group's options select has a fused CUDA form (the defaults)."""
    return all(get_stage(slot, opts.get(slot, default)).fused for slot, default in SLOTS.items())
