"""The statistics of a Muon step's NS outputs, recomputed after the step (``Muon.recompute_stats``).

``Muon(diagnostics=True)`` measures the NS outputs inside the step, which then runs every batch eagerly (no CUDA
graph, no repeated step) and leaves the next step to rebuild its plan. A run that looks only now and then can
instead leave diagnostics off and recompute the statistics of the step just taken from what it left behind:
each Muon parameter's gradient and (already advanced) momentum buffer give the matrix the step orthogonalized
(the Nesterov blend ``g.lerp(buf, momentum)``, or the buffer), and the group's own NS options orthogonalize it
again, eagerly, as the diagnostics step would have. The cost lands where the caller calls it, not on the steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .options import NS_OPTIONS
from .pipeline import get_stage
from .stages import ns_jobs, run_all, summarise_stats

if TYPE_CHECKING:
    from .muon import Muon

__all__ = ["recompute_stats", "step_updates"]


@torch.no_grad()
def step_updates(opt: Muon, group: dict[str, Any], dtype: torch.dtype | None = None) -> list[tuple[Tensor, Tensor]]:
    """``(parameter, the matrix the last step orthogonalized for it)`` for each parameter of Muon group ``group``
    that has a gradient and a momentum buffer: the Nesterov blend ``g.lerp(buf, momentum)`` of the step's gradient
    and its (advanced) buffer, or the buffer, in ``dtype`` (``None``: the buffer's). Whole, as the parameter is
    shaped (``parts.matrix_parts`` views it as the step does)."""
    found = []
    for p in group["params"]:
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is None or p.grad is None:
            continue
        buf = buf if dtype is None else buf.to(dtype)
        u = p.grad.to(buf.dtype).lerp(buf, float(group["momentum"])) if group["nesterov"] else buf
        found.append((p, u))
    return found


@torch.no_grad()
def recompute_stats(opt: Muon) -> dict[str, float]:
    """``opt.stats()``'s statistics for the step ``opt`` last took, recomputed now (one device sync to read
    them); see the module docstring. Parameters without a gradient or a momentum buffer are left out, like the
    step leaves them out. A postscale stage that keeps state per row (``"normuon"``) starts from a copy of its
    state as the step left it, so its statistics are those of one further step of that state.

    Needs every Muon parameter's whole gradient and buffer on this rank: ``ValueError`` for DTensor parameters
    or a ZeRO-1 executor (there, use ``Muon(diagnostics=True)``)."""
    if opt._has_sharded() or opt._shard_state():
        raise ValueError(
            "recompute_stats needs each Muon parameter's whole gradient and momentum buffer on this rank; with "
            "DTensor parameters or a ZeRO-1 executor use Muon(diagnostics=True) and stats()"
        )
    stats: dict[int, dict[str, list[Tensor]]] = {}
    for gi, group in enumerate(opt.param_groups):
        if group["algorithm"] != "muon":
            continue
        kept = step_updates(opt, group)
        if not kept:
            continue
        updates = [u for _, u in kept]
        states: Any = None
        if get_stage("postscale", group["postscale"]).rows_state:
            states = [opt.state[p]["postscale_state"].clone() for p, _ in kept]
        outputs = [torch.empty_like(u) for u in updates]
        ns = {k: group[k] for k in NS_OPTIONS}
        found = stats.setdefault(gi, {})
        run_all(ns_jobs(updates, outputs, lr=float(group["lr"]), adjust_lr=group["adjust_lr"], ns=ns, stats=found,
                        states=states))  # fmt: skip
    return summarise_stats(stats, opt.param_groups)
