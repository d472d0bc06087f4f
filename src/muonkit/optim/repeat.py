"""Repeated steps: after a step that ran whole through one remembered fused plan, ``Muon.step`` runs that plan again
without its per-parameter work (gathering and checking every gradient, reading every option and state entry),
while the group dicts, their parameters, their structural options, the state mapping and every gradient are
there; one C++ guard call (``accel.guards``) then checks the tensors' metadata. The result equals the full step's.
Measured on an H100's host (GPT-2 small, Gram NS, no split): 0.09-0.36 ms before the first launch.
"""

from __future__ import annotations

import copy
import operator
from itertools import repeat
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from ..accel import guards as _guards
from ..accel.finite import FiniteScan
from ..coefficients import is_file_spec
from .adamw import adamw_group
from .functional import _STEP_DEFAULTS
from .nonfinite import defer, device_check, device_flag
from .options import REPEAT_KEY, SCHEDULED, as_numbers
from .plans import _data_ptr, _decays, _devices, _streams_on
from .remembered import _Remembered, _same_environment
from .stages import all_finite as _all_finite
from .stages import pack_counts

if TYPE_CHECKING:
    from .muon import Muon

__all__ = ["Repeat", "repeatable", "step_again"]

# What a repeated step must find unchanged in a group (lr, momentum and weight decay are read every step)
_READ = {"muon": operator.itemgetter(*REPEAT_KEY), "adamw": operator.itemgetter("algorithm")}
_grad = operator.attrgetter("grad")
_momentum_buffer = operator.itemgetter("momentum_buffer")


class Repeat(NamedTuple):
    """A step that ran whole through one remembered fused plan (``plans._Remembered``), with what must hold
    for a later step to run that plan again straight away (``Muon._step_again``): the same state mapping, the
    same group dicts holding the same parameters with the same structural options, every parameter with a
    gradient. ``guard`` (or ``light``) then checks the tensors' metadata, ``plans._same_environment`` the
    switches and current streams, as ``plans._remembered_plan`` would."""

    state: Any  # ``self.state`` (``load_state_dict`` replaces it)
    groups: list[dict[str, Any]]
    params: list[list[Tensor]]  # a copy of each group's parameter list
    options: list[tuple[Any, tuple]]  # per group: a reader of its structural options (``_STRUCTURE``;
    # AdamW groups: the algorithm) and a copy of what it read
    flat: list[Tensor]  # the Muon groups' parameters, then the AdamW groups'
    muon: int  # how many of ``flat`` are Muon parameters
    calls: list[tuple[int, int, int, dict[str, Any], bool]]  # per Muon call: start, end in flat, group, options, decays
    devices: list[torch.device]  # the calls' devices, in their order, each once (``plans._devices``)
    adamw: list[tuple[int, int, int, Tensor | None]]  # per AdamW group: start, end in flat, group index, and its
    # step counts packed into one tensor (``stages.pack_counts``; None where they could not be)
    guard: Any  # over the Muon parameters, all gradients, the momentum buffers (``plans._Remembered``'s own
    # guard covers the same Muon tensors; the AdamW gradients' dtypes and layouts were checked when gathered)
    bufs: list[Tensor]  # the momentum buffers then: while the state holds these very tensors, ``light`` suffices
    light: Any  # ``guard`` without the buffers (only this optimizer makes them; it never changes one's metadata)
    entry: _Remembered
    found_inf: Tensor | None  # where the gradients are checked on the device: the flag (``nonfinite.device_flag``)
    scan: FiniteScan | None  # with it, where its kernel reads the gradients: the check (else ``device_check``)
    names: list[tuple[int, int]]  # per entry of ``flat``: (group index, index in the group), for errors
    steps: list[Tensor]  # the AdamW parameters' step counts (``nonfinite.defer``)


def _snapshot(value: Any) -> Any:
    """A copy of an option value (or a tuple of them, each copied) that later in-place changes to the original do
    not reach; other values as they are (a callable ``adjust_lr`` stays itself, so that it compares equal)."""
    if isinstance(value, tuple):
        return tuple(_snapshot(v) for v in value)
    return copy.deepcopy(value) if isinstance(value, list | dict | set) else value


def repeatable(
    opt: Muon, gathered: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]], pending: list, entry: _Remembered
) -> Repeat | None:
    """What lets the next step skip ``_gather`` and ``_muon_group`` (``_Repeat``), after a step whose Muon
    groups all ran through ``entry``; ``None`` where that cannot be: a parameter without a gradient, sharded
    or executor-driven steps, diagnostics, a coefficient file (read again when it changes)."""
    if opt.executor is not None or opt.diagnostics:
        return None
    muon = [(gi, group, ps) for gi, (group, ps, _) in enumerate(gathered) if group["algorithm"] == "muon"]
    adamw = [(gi, group, ps) for gi, (group, ps, _) in enumerate(gathered) if group["algorithm"] == "adamw"]
    if len(pending) != len(muon):  # sharded parameters or ZeRO rows took their own path
        return None
    if any(len(ps) != len(group["params"]) for group, ps, _ in gathered):
        return None  # a parameter without a gradient
    flat: list[Tensor] = []
    grads: list[Tensor] = []
    bufs: list[Tensor] = []
    calls = []
    for (gi, group, ps), (call_params, call_grads, call_bufs, opts) in zip(muon, pending):
        if len(call_params) != len(ps) or is_file_spec(group["coefficients"]):
            return None
        if ps:  # muon_steps drops empty calls
            options = {**_STEP_DEFAULTS, **opts}
            calls.append((len(flat), len(flat) + len(ps), gi, options, _decays(options)))
            flat += call_params
            grads += call_grads
            bufs += call_bufs
    n_muon = len(flat)
    spans = []
    for gi, _, ps in adamw:  # the step counts advance in one call from now on
        spans.append((len(flat), len(flat) + len(ps), gi, pack_counts([opt.state[p] for p in ps])))
        flat += ps
        grads += gathered[gi][2]
    guard = _guards.tensor_guard([*flat[:n_muon], *grads, *bufs])
    light = _guards.tensor_guard([*flat[:n_muon], *grads])
    if guard is None or light is None:
        return None
    try:
        structure = [(read, _snapshot(read(g))) for g, _, _ in gathered for read in [_READ[g["algorithm"]]]]
    except KeyError:  # an option missing (a group dict edited by hand; load_state_dict fills later ones)
        return None
    names = [(gi, i) for _, _, gi, _, _ in calls for i in range(len(gathered[gi][1]))]
    names += [(gi, i) for _, _, gi, _ in spans for i in range(len(gathered[gi][1]))]
    steps = [opt.state[p]["step"] for p in flat[n_muon:]]
    flag = device_flag(opt, grads)
    scan = FiniteScan(grads, flag) if flag is not None and FiniteScan.applies(grads) else None
    devices = _devices([call for call in pending if call[0]])  # the calls step_again runs (empty ones dropped)
    return Repeat(
        opt.state, [g for g, _, _ in gathered], [list(g["params"]) for g, _, _ in gathered], structure, flat,
        n_muon, calls, devices, spans, guard, bufs, light, entry, flag, scan, names, steps,
    )  # fmt: skip


def step_again(opt: Muon, rec: Repeat) -> bool:
    """The step of ``rec`` again with the current gradients, numbers and momentum buffers, where everything
    ``rec`` records still holds and the plan's guard passes; else nothing is changed and ``False``.
    The same result as the full step (``_gather``, ``_muon_group``, ``muon_steps``), with the host work of
    reading every gradient's checks and every option left out. The Muon groups run before the AdamW groups
    (the full step has them the other way round; they touch different tensors)."""
    if opt.state is not rec.state or opt.diagnostics or opt.executor is not None:
        return False
    groups = opt.param_groups
    if len(groups) != len(rec.groups):
        return False
    for group, known, params, options in zip(groups, rec.groups, rec.params, rec.options):
        ps = group["params"]
        if group is not known or len(ps) != len(params) or not all(map(operator.is_, ps, params)):
            return False
        read, values = options
        try:
            if read(group) != values:
                return False
        except KeyError:
            return False
    grads = list(map(_grad, rec.flat))
    if not all(map(operator.is_not, grads, repeat(None))):
        return False
    muon = rec.flat[: rec.muon]
    try:
        bufs = list(map(_momentum_buffer, map(opt.state.__getitem__, muon)))
    except KeyError:
        return False
    if all(map(operator.is_, bufs, rec.bufs)):
        if not rec.light.check(*muon, *grads):
            return False
    elif not rec.guard.check(*muon, *grads, *bufs):
        return False
    calls = []
    for start, end, gi, opts, decays in rec.calls:
        group = groups[gi]
        opts.update(as_numbers({k: group[k] for k in SCHEDULED}))
        if _decays(opts) != decays:
            return False
        calls.append((rec.flat[start:end], grads[start:end], bufs[start:end], opts))
    streams = _streams_on(rec.devices)
    if not _same_environment(rec.entry, streams):
        return False
    flag = rec.found_inf if opt.nonfinite != "ignore" else None
    ptrs = list(map(_data_ptr, grads))  # read once, for the scan's table and the batches' (one call in C)
    if flag is not None:  # no host sync: the kernels read the flag
        if rec.scan is not None:  # one graph replay (the guard above checked the gradients' shapes and dtypes)
            finite = rec.scan.run(grads, None if streams is None else streams.get(flag.device), ptrs)
        else:
            finite = device_check(grads, flag)
    elif opt.nonfinite != "ignore" and not bool(_all_finite(grads).all()):
        return False  # the full step raises or skips, and says which parameter
    rec.entry.plan.run(calls, streams, flag, ptrs[: rec.muon])
    for start, end, gi, counts in rec.adamw:
        adamw_group(opt.state, groups[gi], rec.flat[start:end], grads[start:end], flag, counts)
    if flag is not None:
        owners = None if rec.scan is None else rec.scan.owners
        defer(opt, flag, finite, rec.names, rec.steps, owners)  # read when the next step starts (``nonfinite.settle``)
    return True
