"""The Muon optimizer: functional steps, the ``Muon`` class and parameter grouping."""

from .functional import muon_step, muon_steps
from .grouping import ParamPlan, classify, describe, param_groups
from .muon import Muon, NonFiniteGradientError
from .stages import adamw_step, lr_scale

__all__ = [
    "Muon",
    "NonFiniteGradientError",
    "ParamPlan",
    "adamw_step",
    "classify",
    "describe",
    "lr_scale",
    "muon_step",
    "muon_steps",
    "param_groups",
]
