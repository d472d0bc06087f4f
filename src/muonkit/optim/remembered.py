"""Remembered step plans: where every call of a step took the fused path, its plan is kept with a guard over its
tensors' metadata (``accel.guards``, a C++ check of every tensor's dtype, device, shape, strides and
``requires_grad``), so that a later step with the same structure runs it without re-checking each tensor in
Python (``functional._muon_steps``, ``repeat.step_again``). At most ``_MAX_REMEMBERED`` are kept, most recent
first; an entry is found only by its state key (options, environment) and a passing guard, so two optimizers of
different structure never run each other's plan."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..accel import fused, kernels
from ..accel import guards as _guards
from .options import plan_key
from .plans import Streams, _decays, _StepPlan, _stream_ids
from .stages import StepCall

__all__: list[str] = []


class _Remembered(NamedTuple):
    """A plan with what must hold for a step to run it unchecked: the state key (its first item the environment,
    ``_environment``) and a guard over the tensors."""

    state: tuple
    guard: Any
    plan: _StepPlan


_REMEMBERED: list[_Remembered] = []  # most recent first
_MAX_REMEMBERED = 4


def _environment(streams: Streams | None) -> tuple:
    """What a step plan depends on apart from the calls themselves: the fused and kernel switches, grad mode and
    each device's current stream (``_streams``: ``None`` where graphs may not be replayed now)."""
    return (fused.fused_enabled(), kernels.get_mode(), torch.is_grad_enabled(), _stream_ids(streams))


def _state_key(calls: Sequence[StepCall], streams: Streams | None) -> tuple | None:
    """Everything apart from the tensors' metadata that decides whether the fused path takes ``calls`` and which
    plan it makes: the environment (``_environment``), each call's structure and length. ``None`` where an
    option cannot be compared as a key."""
    key = (_environment(streams), tuple(
        (len(ps), len(gs), len(bs), opts["executor"] is None, plan_key(opts), _decays(opts))
        for ps, gs, bs, opts in calls
    ))  # fmt: skip
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _tensors(calls: Sequence[StepCall]) -> list[Tensor]:
    return [t for ps, gs, bs, _ in calls for ts in (ps, gs, bs) for t in ts]


def _remembered_plan(calls: Sequence[StepCall], state: tuple) -> _Remembered | None:
    """The remembered plan of an earlier fused step that ``calls`` match (the same ``state``, their
    ``_state_key``; every tensor with the same dtype, device, shape, strides, layout and ``requires_grad``),
    else ``None``."""
    for i, entry in enumerate(_REMEMBERED):
        if entry.state == state and entry.guard.check(*_tensors(calls)):
            if i:
                _REMEMBERED.insert(0, _REMEMBERED.pop(i))
            return entry
    return None


def _remember(calls: Sequence[StepCall], state: tuple, plan: _StepPlan) -> _Remembered | None:
    """Keep ``plan`` for later steps that match ``calls`` and ``state`` (their ``_state_key``); returns what is
    kept (``None`` where torch has no tensor guards)."""
    guard = _guards.tensor_guard(_tensors(calls))
    if guard is None:
        return None
    entry = _Remembered(state, guard, plan)
    _REMEMBERED.insert(0, entry)
    del _REMEMBERED[_MAX_REMEMBERED:]
    return entry


def _same_environment(entry: _Remembered, streams: Streams | None) -> bool:
    """Whether the environment (``_environment``) is the one ``entry``'s plan was made in. With the rest of the
    state key the same and every tensor's metadata unchanged (what ``_remembered_plan`` checks, and
    ``Muon._step_again`` checks its own way), the plan may run its calls."""
    return _environment(streams) == entry.state[0]
