"""Muon's per-group options, each in one record: its default, its check, and what depends on it.

``Muon``'s signature, ``Muon.load_state_dict`` (options missing from an older checkpoint), the repeated-step
path, step plans (``functional``) and the sharded steps all read these records; a new option is one more
``Option`` here (and its keyword in ``Muon.__init__``, whose defaults a test holds equal to ``DEFAULTS``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..coefficients import as_preset
from ..newton_schulz import METHODS, NS_DTYPES, restart_positions
from .parts import split_key
from .pipeline import SLOTS, stage_names

__all__ = ["ADJUST_LR_MODES", "DEFAULTS", "MATRIX_VIEWS", "NS_OPTIONS", "OPTIONS", "Option", "group_errors"]

ADJUST_LR_MODES = ("original", "match_rms_adamw", None)
MATRIX_VIEWS = ("flatten", "batch")


def _real(x: Any) -> bool:
    """A real number: an int or float (not a bool, not a string), or a one-element floating tensor."""
    if isinstance(x, torch.Tensor):
        return x.numel() == 1 and x.is_floating_point()
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _nonneg(x: Any) -> bool:
    return _real(x) and math.isfinite(float(x)) and float(x) >= 0


def _int(x: Any, low: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _adjust_lr_ok(x: Any) -> bool:
    if isinstance(x, int | float) and not isinstance(x, bool):
        return x > 0 and math.isfinite(x)
    return x in ADJUST_LR_MODES or callable(x)


def _must(ok: Callable[[Any], bool], expected: str) -> Callable[[str, Any], str | None]:
    """A check: ``None`` where ``ok(value)``, else "``name`` must be ``expected``, got ``value``"."""
    return lambda name, value: None if ok(value) else f"{name} must be {expected}, got {value!r}"


def _coefficients_error(name: str, value: Any) -> str | None:
    try:
        as_preset(value)
    except (TypeError, ValueError) as err:
        return str(err)
    return None


def _unchecked(name: str, value: Any) -> str | None:
    return None


def _stage(slot: str) -> Callable[[str, Any], str | None]:
    """The check of a pipeline slot's option (``pipeline.SLOTS``): the name of a stage registered in the slot,
    read when checked, so that stages registered after import count."""

    def check(name: str, value: Any) -> str | None:
        choices = stage_names(slot)
        ok = isinstance(value, str) and value in choices
        return None if ok else f"{name} must be one of {choices}, got {value!r}"

    return check


@dataclass(frozen=True)
class Option:
    """One Muon-group option.

    ``check(name, value)`` returns an error message or ``None``. ``every_step``: read afresh by every step (lr,
    momentum, weight decay), so changing it needs no new plan. ``in_plan``: a step plan's batches and graphs depend
    on it (``functional``'s plan key). ``ns``: an option of the orthogonalization itself (what the sharded steps
    take as ``**options``)."""

    name: str
    default: Any
    check: Callable[[str, Any], str | None]
    every_step: bool = False
    in_plan: bool = True
    ns: bool = True


OPTIONS: tuple[Option, ...] = (
    Option("lr", 0.02, _must(_nonneg, "a finite number >= 0"), every_step=True, in_plan=False, ns=False),
    Option("momentum", 0.95, _must(lambda v: _nonneg(v) and v < 1, "in [0, 1)"), True, False, False),
    Option("nesterov", True, _must(lambda v: isinstance(v, bool), "True or False"), ns=False),
    Option("weight_decay", 0.0, _must(_nonneg, "a finite number >= 0"), every_step=True, in_plan=False, ns=False),
    Option("ns_steps", 5, _must(lambda v: v is None or _int(v, 0), "a non-negative int or None")),
    Option("coefficients", "jordan", _coefficients_error),
    Option(
        "adjust_lr",
        "original",
        _must(
            _adjust_lr_ok,
            f"one of {ADJUST_LR_MODES}, a scale factor > 0 (lr * f * sqrt(max(rows, cols))) "
            "or a callable f(lr, (rows, cols))",
        ),
        in_plan=False,  # read by every step's scale; still part of what a repeated step checks
        ns=False,
    ),
    Option("eps", 1e-7, _must(_nonneg, "a finite number >= 0")),
    Option("ns_dtype", None, _must(lambda v: v is None or v in NS_DTYPES, f"None or one of {NS_DTYPES}")),
    Option("method", "auto", _must(lambda v: v in METHODS, f"one of {METHODS}")),
    Option("restarts", None, _unchecked),  # checked with method and coefficients: group_errors
    Option("matrix_view", "flatten", _must(lambda v: v in MATRIX_VIEWS, f"one of {MATRIX_VIEWS}")),
    Option("split", None, _unchecked),  # checked against each parameter's shape by Muon (parts.matrix_parts)
    Option("max_batch", None, _must(lambda v: v is None or _int(v, 1), "None or an int >= 1")),
    Option(
        "momentum_dtype",
        torch.float32,
        _must(lambda v: v is None or (isinstance(v, torch.dtype) and v.is_floating_point), "None or a floating dtype"),
        in_plan=False,
        ns=False,
    ),
    *(Option(slot, default, _stage(slot), ns=slot != "update") for slot, default in SLOTS.items()),
)
DEFAULTS: dict[str, Any] = {o.name: o.default for o in OPTIONS}
NS_OPTIONS: dict[str, Any] = {o.name: o.default for o in OPTIONS if o.ns}
REPEAT_KEY: tuple[str, ...] = ("algorithm", *(o.name for o in OPTIONS if not o.every_step))
PLAN_KEY: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.in_plan)
STEP_OPTIONS: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.name != "momentum_dtype")  # what steps take
_BY_NAME = {o.name: o for o in OPTIONS}
ADAMW_CHECKED = ("lr", "weight_decay", "eps")  # with betas (group_errors); AdamW groups share these checks


def group_errors(group: dict[str, Any]) -> list[str]:
    """What is wrong with a group's options (empty when nothing): each option's own check, then the checks that
    involve several (``restarts`` against ``method`` and the coefficients' schedule; AdamW's ``betas``)."""
    if group["algorithm"] == "adamw":
        errors = [e for n in ADAMW_CHECKED if (e := _BY_NAME[n].check(n, group[n]))]
        betas = group["betas"]
        if not (len(betas) == 2 and all(_nonneg(b) and b < 1 for b in betas)):
            errors.append(f"betas must be two numbers in [0, 1), got {betas!r}")
        return errors
    errors = [e for o in OPTIONS if (e := o.check(o.name, group.get(o.name, o.default)))]
    restarts = group.get("restarts")
    if restarts is not None:
        if group["method"] not in ("gram", "auto"):
            errors.append(f"restarts applies to method='gram' or 'auto' only, got method={group['method']!r}")
        elif not isinstance(restarts, list | tuple):
            errors.append(f"restarts must be None or a list of step indices, got {restarts!r}")
        elif not any(e.startswith(("ns_steps ", "coefficients")) for e in errors):
            try:
                restart_positions(restarts, len(as_preset(group["coefficients"]).schedule(group["ns_steps"])))
            except ValueError as err:
                errors.append(str(err))
    return errors


def plan_key(opts: dict[str, Any]) -> tuple:
    """The options a step plan depends on, hashable: the coefficients as their ``Preset`` (a saved ``.json``
    preset is re-read when the file changes), lists as tuples, the split as ``parts.split_key``."""
    key = []
    for name in PLAN_KEY:
        value = opts[name]
        if name == "coefficients":
            value = as_preset(value)
        elif name == "split":
            value = split_key(value)
        elif isinstance(value, list):
            value = tuple(value)
        key.append(value)
    return tuple(key)


def step_options(group: dict[str, Any]) -> dict[str, Any]:
    """A Muon group's options as the step functions take them (all but ``momentum_dtype``, used for state), the
    scheduled numbers as ``as_numbers`` gives them."""
    return as_numbers({name: group[name] for name in STEP_OPTIONS})


SCHEDULED = ("lr", "momentum", "weight_decay")  # what schedules change, which a group may hold as 0-d tensors


def as_numbers(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with the ``SCHEDULED`` entries held as tensors read as floats (a CPU tensor is read without a
    device sync), except while ``torch.compile`` traces: there they stay tensors, so that the compiled step reads
    them as inputs and does not recompile for each new value (such a call takes the torch path)."""
    if torch.compiler.is_compiling():
        return values
    held = [k for k in SCHEDULED if isinstance(values.get(k), torch.Tensor)]
    return {**values, **{k: float(values[k]) for k in held}} if held else values


def holds_tensors(values: dict[str, Any]) -> bool:
    """Whether a step's ``SCHEDULED`` numbers include a tensor (only while ``torch.compile`` traces, after
    ``as_numbers``): the fused CUDA kernels take them as numbers, so such a step takes the torch path."""
    return any(isinstance(values.get(k), torch.Tensor) for k in SCHEDULED)
