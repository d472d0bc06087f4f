"""``Muon``'s state and groups: what it checks before anything changes (a group being added, ``check_group``; a
state dict being loaded, ``_check_loadable``; a stored momentum buffer at each step, ``_check_buffer``), how its
state dict is written and restored (``whole_buffers``, ``restore_after_load``), and marking state static."""

from __future__ import annotations

import inspect
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..accel import from_env as accel_from_env
from .options import DEFAULTS, group_errors
from .parts import matrix_parts, row_state_shape
from .shards import gather_rows, is_sharded, my_rows, shard_rows

if TYPE_CHECKING:
    from .muon import Muon

# the state entries each algorithm makes: anything else comes from another optimizer
_STATE_KEYS = {"muon": {"momentum_buffer", "postscale_state"}, "adamw": {"step", "exp_avg", "exp_avg_sq"}}


def _check_loadable(opt: Muon, state_dict: dict[str, Any]) -> None:
    """Raise ``ValueError`` (naming the group or parameter) unless ``state_dict`` is one ``opt`` can load: a
    muonkit ``Muon`` dict with this optimizer's groups, valid options, and state tensors that fit their
    parameters. Checks only; changes nothing."""
    try:
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    except (KeyError, TypeError):
        raise ValueError("not an optimizer state dict: it needs 'param_groups' and 'state'") from None
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(
            f"the state dict has {len(saved_groups)} parameter groups, this optimizer {len(opt.param_groups)}"
        )
    for gi, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
        where = f"param group {gi}"
        if "algorithm" not in saved:
            raise ValueError(
                f"{where} of the state dict has no 'algorithm': it was not saved by muonkit.Muon (another "
                "optimizer's state cannot be loaded into Muon)"
            )
        if saved["algorithm"] != group["algorithm"]:
            raise ValueError(
                f"{where}: the state dict's group runs {saved['algorithm']!r}, this optimizer's {group['algorithm']!r}"
            )
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"{where}: the state dict's group has {len(saved['params'])} parameters, this one "
                f"{len(group['params'])}"
            )
        # the group as loading leaves it: the saved dict, and for Muon groups the defaults of options it lacks
        loaded = {**DEFAULTS, **saved} if saved["algorithm"] == "muon" else saved
        errors = group_errors(loaded)
        if errors:
            raise ValueError(f"{where} of the state dict: " + "; ".join(errors))
        for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
            entry = saved_state.get(pid)
            if entry is None:
                continue
            name = opt._param_name(group, gi, i)
            unknown = set(entry) - _STATE_KEYS[saved["algorithm"]]
            if unknown:
                raise ValueError(
                    f"state of parameter {name} holds {sorted(unknown)}, which {saved['algorithm']!r} groups do not "
                    "make: is this another optimizer's state dict?"
                )
            for key, value in entry.items():
                if key == "postscale_state":  # a rows_state stage's (pipeline): one number per matrix row
                    _check_tensor(name, key, value, row_state_shape(p.shape, loaded["matrix_view"], loaded["split"]))
                elif key != "step":
                    _check_tensor(name, key, value, tuple(p.shape))
                elif not isinstance(value, Tensor) or value.numel() != 1:
                    raise ValueError(f"state 'step' of parameter {name} must be a one-number tensor, got {value!r}")


def _fits(value: Any, shape: tuple[int, ...]) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point() and tuple(value.shape) == shape


def _check_tensor(name: str, key: str, value: Any, shape: tuple[int, ...]) -> None:
    """``ValueError`` unless state ``key`` of parameter ``name`` is a floating tensor of ``shape``."""
    if _fits(value, shape):
        return
    if not isinstance(value, Tensor):
        raise ValueError(f"state {key!r} of parameter {name} is a {type(value).__name__}, not a tensor")
    if not value.is_floating_point():
        raise ValueError(f"state {key!r} of parameter {name} has dtype {value.dtype}, not a floating dtype")
    raise ValueError(f"state {key!r} of parameter {name} has shape {tuple(value.shape)}, it must be {shape}")


def muon_state(opt: Muon, group: dict[str, Any], params: list[Tensor], rows_only: bool,
               stateful: bool) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
    """The momentum buffers of a Muon group's ``params`` (made on first use, checked after: ``_check_buffer``), and
    with ``stateful`` (a ``rows_state`` postscale stage) their row states, float32 zeros of ``row_state_shape``,
    whole on every rank. ``rows_only``: ZeRO-1, where a replicated parameter's buffer holds this rank's rows."""
    bufs, states = [], []
    for p in params:
        state = opt.state[p]
        if "momentum_buffer" not in state:
            dtype = group["momentum_dtype"] or p.dtype
            if rows_only and not is_sharded(p):  # ZeRO-1: this rank's rows only
                rows = shard_rows(p.shape[0], opt.executor.world_size)[opt.executor.rank]  # type: ignore[union-attr]
                state["momentum_buffer"] = torch.zeros((rows, *p.shape[1:]), dtype=dtype, device=p.device)
            else:  # zeros_like keeps a DTensor's sharding, so the state is sharded like the parameter
                state["momentum_buffer"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
            _static(state["momentum_buffer"])
        else:
            _check_buffer(opt, group, p, state["momentum_buffer"], rows_only)
        bufs.append(state["momentum_buffer"])
        if stateful:
            shape = row_state_shape(p.shape, group["matrix_view"], group["split"])
            kept = state.get("postscale_state")
            if kept is None or tuple(kept.shape) != shape:  # new, or the group's matrix view or split changed
                state["postscale_state"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
            states.append(state["postscale_state"])
    return bufs, states


def _check_buffer(opt: Muon, group: dict[str, Any], p: Tensor, buf: Any, rows_only: bool) -> None:
    """A stored momentum buffer fits its parameter (whole, or this rank's rows with ZeRO-1 state), else
    ``ValueError`` naming the parameter; called before the step changes anything. Cheap where it fits (every
    full step calls it per parameter): the name is looked up only to raise."""
    if rows_only and not is_sharded(p):
        rows = shard_rows(p.shape[0], opt.executor.world_size)[opt.executor.rank]  # type: ignore[union-attr]
        want: tuple[int, ...] = (rows, *p.shape[1:])
    else:
        want = tuple(p.shape)
    if _fits(buf, want):
        return
    gi = next(i for i, g in enumerate(opt.param_groups) if g is group)
    _check_tensor(opt._param_name(group, gi, next(k for k, q in enumerate(group["params"]) if q is p)),
                  "momentum_buffer", buf, want)  # fmt: skip


def check_group(opt: Muon, group: dict[str, Any], gi: int) -> None:
    """Raise ``ValueError`` naming the group or parameter unless a group being added is one ``opt`` can step:
    valid options (``options.group_errors``), floating parameters with storage, and for Muon real matrices whose
    views and splits work (``parts.matrix_parts``)."""

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"param group {gi} ({group['algorithm']}): {message}")

    errors = group_errors(group)
    check(not errors, "; ".join(errors))
    for i, p in enumerate(group["params"]):
        name = opt._param_name(group, gi, i)
        if not (p.is_floating_point() or p.is_complex()):
            raise ValueError(f"parameter {name} has dtype {p.dtype}; optimizers step floating-point parameters")
        if p.device.type == "meta":
            raise ValueError(
                f"parameter {name} is on the meta device (no storage): build the optimizer after the model's "
                "parameters are materialized (e.g. model.to_empty(device=...) and initialised)"
            )
    if group["algorithm"] == "adamw":
        return
    for i, p in enumerate(group["params"]):
        name = opt._param_name(group, gi, i)
        if p.ndim < 2:
            raise ValueError(
                f"Muon needs matrices, but parameter {name} has shape {tuple(p.shape)}. Put 0-D/1-D "
                "parameters (biases, norm gains) in an algorithm='adamw' group: "
                "muonkit.param_groups(model) does this for you."
            )
        if p.is_complex():
            raise ValueError(f"parameter {name} is complex; Muon supports real parameters only")
        try:
            matrix_parts(_meta(p), group["matrix_view"], group["split"])
        except ValueError as err:
            raise ValueError(f"parameter {name} of shape {tuple(p.shape)}: {err}") from None


def _static(*tensors: Tensor) -> None:
    """Tell torch.compile the state lives at a fixed address, as torch.optim does for its state: the
    compiled step may then mutate it inside a CUDA graph (mode="reduce-overhead") instead of skipping graphs.
    State made while torch.compile traces (a compiled first step) is not marked: dynamo forbids tracing the call
    (found by the CUDA test of a compiled first step; on the CPU nothing is marked)."""
    mark = getattr(getattr(torch, "_dynamo", None), "mark_static_address", None)
    if mark is None or torch.compiler.is_compiling():
        return
    for t in tensors:
        if not is_sharded(t) and t.device.type == "cuda":
            mark(t)


def _meta(p: Tensor) -> Tensor:
    """A storage-free stand-in with ``p``'s global shape (for shape checks that must not touch DTensors)."""
    return torch.empty(p.shape, device="meta")


def whole_buffers(opt: Muon, sd: dict[str, Any]) -> dict[str, Any]:
    """``sd`` (torch.optim's state dict of ``opt``) with ZeRO-1 momentum rows gathered into whole buffers, so that
    any world size can load it (a collective where the state is sharded: every rank must call it)."""
    if opt._shard_state():
        params = list(chain.from_iterable(g["params"] for g in opt.param_groups))
        state = dict(sd["state"])
        for pid in sorted(state):
            p = params[pid]
            entry = state[pid]
            if "momentum_buffer" in entry and not is_sharded(p):
                state[pid] = {
                    **entry,
                    "momentum_buffer": gather_rows(entry["momentum_buffer"], p.shape, opt.executor),  # type: ignore[arg-type]
                }
        sd["state"] = state
    return sd


# Muon's own settings that pickle and deepcopy keep (``Muon.__getstate__``), with the constructor's defaults for an
# optimizer pickled before they were kept; what steps build as they run is made afresh (``Muon._reset_runtime``)
PICKLED = ("accel", "nonfinite", "_nonfinite_skips", "comm_dtype", "diagnostics", "_adamw_defaults")


def pickled_settings(opt: Muon) -> dict[str, Any]:
    return {name: getattr(opt, name) for name in PICKLED if hasattr(opt, name)}


def restore_settings(opt: Muon, kept: dict[str, Any]) -> None:
    """``kept`` (``pickled_settings``) back on ``opt``; what it lacks takes the constructor's default."""
    arg = {name: p.default for name, p in inspect.signature(type(opt).__init__).parameters.items()}
    adamw = {"lr": arg["adamw_lr"], "betas": tuple(arg["adamw_betas"]), "eps": arg["adamw_eps"],
             "weight_decay": opt.defaults.get("weight_decay", arg["weight_decay"])}  # fmt: skip
    defaults = {"accel": accel_from_env(), "nonfinite": arg["nonfinite"], "_nonfinite_skips": 0,
                "comm_dtype": arg["comm_dtype"], "diagnostics": arg["diagnostics"],
                "_adamw_defaults": adamw}  # fmt: skip
    for name in PICKLED:
        setattr(opt, name, kept.get(name, defaults[name]))


def restore_after_load(opt: Muon, state_dict: dict[str, Any]) -> None:
    """After torch.optim's ``load_state_dict``: the defaults of options an older checkpoint lacks, the saved
    dtypes of state tensors, this rank's rows of whole buffers (ZeRO-1), state marked static."""
    for group in opt.param_groups:  # a checkpoint from before an option existed: the option's default
        if group.get("algorithm", "muon") == "muon":
            for key, value in DEFAULTS.items():
                group.setdefault(key, value)
    # torch.optim casts floating-point state to the parameter's dtype on load; Muon keeps its
    # momentum in its own dtype (float32 for bf16 weights), so restore the saved dtypes.
    saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = chain.from_iterable(g["params"] for g in opt.param_groups)
    for pid, p in zip(saved_ids, params):
        for key, value in state_dict["state"].get(pid, {}).items():
            current = opt.state[p].get(key)
            if isinstance(value, Tensor) and isinstance(current, Tensor) and value.dtype != current.dtype:
                opt.state[p][key] = value.to(device=p.device, copy=True)
        buf = opt.state[p].get("momentum_buffer")
        if opt._shard_state() and buf is not None and not is_sharded(p):
            opt.state[p]["momentum_buffer"] = my_rows(buf, opt.executor)  # type: ignore[arg-type]
    for st in opt.state.values():
        _static(*(t for t in st.values() if isinstance(t, Tensor)))
