"""What ``Muon.load_state_dict`` and ``Muon.step`` check of saved or stored state before anything changes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

from .options import DEFAULTS, group_errors
from .sharded import is_sharded, shard_rows

if TYPE_CHECKING:
    from .muon import Muon

# the state entries each algorithm makes: anything else comes from another optimizer
_STATE_KEYS = {"muon": {"momentum_buffer"}, "adamw": {"step", "exp_avg", "exp_avg_sq"}}


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
                if key != "step":
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
