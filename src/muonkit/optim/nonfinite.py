"""What a NaN or Inf gradient does to a ``Muon`` step (its ``nonfinite`` policy): found in one multi-tensor pass
with one host sync (``stages.all_finite``), agreed across ranks where parameters or work are spread over them, then
raised as ``NonFiniteGradientError`` naming the parameters, or the whole step skipped and counted."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from .shards import any_rank, local
from .stages import all_finite

if TYPE_CHECKING:
    from .muon import Muon

__all__ = ["NONFINITE_POLICIES", "NonFiniteGradientError", "nonfinite_names", "nonfinite_skip"]

NONFINITE_POLICIES = ("raise", "skip", "ignore")
Gathered = list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]  # per group: (group, params, grads) that step


class NonFiniteGradientError(FloatingPointError):
    """A gradient held NaN or Inf and the optimizer's ``nonfinite`` policy is ``"raise"``."""


def nonfinite_names(opt: Muon, gathered: Gathered) -> list[str]:
    grads = [g for _, _, gs in gathered for g in gs]
    if not grads:
        return []
    finite = all_finite([local(g) for g in grads])  # one host sync
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


def nonfinite_skip(opt: Muon, gathered: Gathered) -> bool:
    """Whether ``opt`` skips this step for a non-finite gradient (policy ``"skip"``; counted in
    ``nonfinite_skips``); under ``"raise"`` raises ``NonFiniteGradientError`` instead. Nothing has changed yet."""
    bad = nonfinite_names(opt, gathered)
    agree = getattr(opt.executor, "any_rank", None)
    if agree is None and opt._has_sharded():
        agree = any_rank  # every rank holding shards must take the same decision
    if agree is not None and agree(bool(bad)) and not bad:
        bad = ["(a parameter on another rank)"]  # every rank must take the same decision
    if not bad:
        return False
    if opt.nonfinite == "skip":
        opt.nonfinite_skips += 1
        return True
    raise NonFiniteGradientError(
        f"non-finite (NaN/Inf) gradient in {len(bad)} parameter(s): {', '.join(bad[:5])}"
        f"{' ...' if len(bad) > 5 else ''}. No parameter or state was changed. Pass "
        "nonfinite='skip' to skip such steps, or clip/scale the loss (e.g. GradScaler)."
    )
