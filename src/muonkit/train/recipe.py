"""The training recipe every optimizer of a comparison gets: learning-rate schedule, weight decay, gradient clipping.

An optimizer comparison is only as fair as its baseline's recipe. The demo's default is what each optimizer's users
run: linear warmup then cosine decay to a floor (the GPT-3 / nanoGPT schedule), or warmup-stable-decay; decoupled
weight decay; gradient clipping at norm 1. Weight decay follows each optimizer's own standard:

- AdamW: 0.1 on every parameter with two or more dimensions, none on gains and biases (GPT-3, nanoGPT);
- Muon (and its variants, torch.optim.Muon): 0.01 on every parameter, its AdamW part included, as in the usage example
  of KellerJordan/Muon (``lr=0.02, weight_decay=0.01`` for the hidden matrices, 0.01 for the rest);
- SGD (Nesterov): none.

The schedule is a function of the step alone (``lr_factor``), so a resumed run continues on the same schedule with no
scheduler state to save.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["DEFAULT_WEIGHT_DECAY", "MOMENTUM_WARMUP_FRACTION", "SCHEDULES", "Recipe"]

SCHEDULES = ("cosine", "wsd", "constant")
# ``muon_mw`` (Muon with momentum warmup) warms its momentum up over this fraction of the run where the recipe sets no
# momentum warmup of its own: the modded-nanogpt speedrun raises Muon's momentum from 0.85 to 0.95 over its first 300
# steps, about a sixth of its run
MOMENTUM_WARMUP_FRACTION = 1 / 6
DEFAULT_WEIGHT_DECAY: dict[str, float] = {
    "muon": 0.01,
    "muon_svd": 0.01,
    "muon_cwd": 0.01,
    "muon_heads": 0.01,
    "muon_heads_o": 0.01,
    "normuon": 0.01,
    "muon_aol": 0.01,
    "muon_eq": 0.01,
    "muon_cans": 0.01,
    "muon_mw": 0.01,
    "torch_muon": 0.01,
    "adamw": 0.1,
    "sgd": 0.0,
}


def _steps(value: Any) -> bool:
    """Whether ``value`` is a number of steps: an int >= 0 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class Recipe:
    """``schedule``: ``"cosine"`` (linear warmup over ``warmup`` steps, then cosine to ``floor`` x the peak at the
    last step), ``"wsd"`` (warmup, constant, then linear decay to ``floor`` over the last ``decay`` fraction of the
    steps) or ``"constant"`` (warmup, then the peak). ``warmup``: steps, ``None`` for 5% of the run.
    ``weight_decay``: per optimizer name (missing names: ``DEFAULT_WEIGHT_DECAY``). ``clip``: the largest gradient
    norm (``torch.nn.utils.clip_grad_norm_`` over all parameters), ``None`` for none. ``momentum_warmup``: steps
    over which the momentum of muonkit's Muon groups rises linearly from ``momentum_start`` to the group's own
    (0: none, except for the optimizer ``muon_mw``: ``momentum_warmup_for``; the momentum is read every step, so
    this needs no new CUDA-graph capture)."""

    schedule: str = "cosine"
    warmup: int | None = None
    floor: float = 0.1
    decay: float = 0.2
    weight_decay: dict[str, float] = field(default_factory=dict)
    clip: float | None = 1.0
    momentum_warmup: int = 0
    momentum_start: float = 0.85

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.warmup is not None and not _steps(self.warmup):
            raise ValueError(f"warmup must be a number of steps >= 0 or None, got {self.warmup!r}")
        if not (0 <= self.floor <= 1):
            raise ValueError(f"floor must be in [0, 1], got {self.floor!r}")
        if not (0 < self.decay <= 1):
            raise ValueError(f"decay must be in (0, 1], got {self.decay!r}")
        for name, wd in self.weight_decay.items():
            if not (math.isfinite(wd) and wd >= 0):
                raise ValueError(f"weight decay for {name} must be a finite number >= 0, got {wd!r}")
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a finite number > 0 or None, got {self.clip!r}")
        if not _steps(self.momentum_warmup):
            raise ValueError(f"momentum_warmup must be a number of steps >= 0, got {self.momentum_warmup!r}")
        if not (0 <= self.momentum_start < 1):
            raise ValueError(f"momentum_start must be in [0, 1), got {self.momentum_start!r}")

    def warmup_steps(self, steps: int) -> int:
        return round(0.05 * steps) if self.warmup is None else min(self.warmup, steps)

    def decay_for(self, name: str) -> float:
        """The weight decay optimizer ``name`` runs with."""
        return self.weight_decay.get(name, DEFAULT_WEIGHT_DECAY.get(name, 0.0))

    def lr_factor(self, step: int, steps: int) -> float:
        """The learning rate of step ``step`` (1 to ``steps``) over the peak."""
        warm = self.warmup_steps(steps)
        if step <= warm:
            return step / warm
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "cosine":
            t = (step - warm) / max(1, steps - warm)
            return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * t))
        start = max(warm, steps - round(self.decay * steps))  # wsd: the decay phase
        if step <= start:
            return 1.0
        return 1 - (1 - self.floor) * (step - start) / max(1, steps - start)

    def describe(self, steps: int, names: list[str]) -> str:
        """One line for the table header: schedule, weight decay per optimizer, clipping."""
        warm = self.warmup_steps(steps)
        shape = {
            "cosine": f"warmup {warm} steps, cosine to {self.floor:g}x",
            "wsd": f"warmup {warm} steps, constant, linear decay to {self.floor:g}x over the last {self.decay:.0%}",
            "constant": f"warmup {warm} steps, then constant",
        }[self.schedule]
        wd = ", ".join(f"{n} {self.decay_for(n):g}" for n in names)
        clip = f"clip {self.clip:g}" if self.clip is not None else "no clipping"
        who = "Muon" if self.momentum_warmup else "muon_mw" if "muon_mw" in names else None
        warm_momentum = self.momentum_warmup_for("muon_mw", steps)
        momentum = f"; {who} momentum from {self.momentum_start:g} over {warm_momentum} steps" if who else ""
        return f"lr: {shape}; weight decay: {wd}; {clip}{momentum}"

    def momentum_warmup_for(self, name: str | None, steps: int) -> int:
        """Steps of momentum warmup in a run of optimizer ``name`` of ``steps`` steps: ``momentum_warmup``, or where
        that is 0, for ``muon_mw`` the first ``MOMENTUM_WARMUP_FRACTION`` of the run (at least one step)."""
        if self.momentum_warmup or name != "muon_mw":
            return self.momentum_warmup
        return max(1, round(MOMENTUM_WARMUP_FRACTION * steps))

    def momentum(self, step: int, peak: float, warmup: int | None = None) -> float:
        """The momentum of a Muon group at step ``step`` (1, 2, ...), rising linearly to ``peak`` over ``warmup``
        steps (``None``: ``momentum_warmup``)."""
        warmup = self.momentum_warmup if warmup is None else warmup
        if not warmup or step > warmup:
            return peak
        return self.momentum_start + (peak - self.momentum_start) * (step - 1) / warmup

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Recipe:
        return cls(**(d or {}))


class Schedule:
    """Sets the learning rate of every parameter group of ``opt`` for each step: its peak (the lr the group had
    when this was made) times ``recipe.lr_factor``; and, with ``recipe.momentum_warmup``, the momentum of
    muonkit's Muon groups (``recipe.momentum``; ``name``, the optimizer's, for ``recipe.momentum_warmup_for``). A
    value the group holds as a tensor is filled in place (what a step compiled with ``torch.compile`` needs to see a
    new value without recompiling)."""

    def __init__(self, opt: torch.optim.Optimizer, recipe: Recipe, steps: int, name: str | None = None) -> None:
        self.opt, self.recipe, self.steps = opt, recipe, steps
        self.momentum_warmup = recipe.momentum_warmup_for(name, steps)
        self.peaks = [float(g["lr"]) for g in opt.param_groups]
        self.momenta = [float(g["momentum"]) if g.get("algorithm") == "muon" else None for g in opt.param_groups]

    def set(self, step: int) -> None:
        factor = self.recipe.lr_factor(step, self.steps)
        for group, peak, momentum in zip(self.opt.param_groups, self.peaks, self.momenta):
            assign(group, "lr", peak * factor)
            if momentum is not None and self.momentum_warmup:
                assign(group, "momentum", self.recipe.momentum(step, momentum, self.momentum_warmup))


def assign(group: dict[str, Any], key: str, value: float) -> None:
    """``group[key] = value``, or ``group[key].fill_(value)`` where the group holds a tensor there."""
    if isinstance(group[key], torch.Tensor):
        group[key].fill_(value)
    else:
        group[key] = value
