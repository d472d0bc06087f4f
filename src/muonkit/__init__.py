"""muonkit: the Muon optimizer, Newton-Schulz orthogonalization and the tools to understand them.

groups = muonkit.param_groups(model)   # hidden matrices -> Muon; embeddings, head, 1-D -> AdamW
opt = muonkit.Muon(groups, lr=0.02, weight_decay=0.01)
O = muonkit.orthogonalize(G)           # approximate polar factor, batched over leading dims

Subpackages load on first use: ``muonkit.design`` (coefficient lab), ``muonkit.theory``, ``muonkit.distributed``,
``muonkit.integrations`` (Hugging Face, Lightning), ``muonkit.accel`` (CUDA acceleration and its switch).
"""

from __future__ import annotations

import importlib
from typing import Any

from . import coefficients
from .monitor import StatsLogger
from .newton_schulz import orthogonalize
from .optim import Muon, NonFiniteGradientError, classify, describe, param_groups
from .qk_clip import QKClip
from .reference import polar_svd

__version__ = "0.1.0"
_LAZY = ("accel", "design", "distributed", "integrations", "theory")
__all__ = [
    "Muon",
    "NonFiniteGradientError",
    "QKClip",
    "StatsLogger",
    "__version__",
    "accel",
    "classify",
    "coefficients",
    "describe",
    "design",
    "distributed",
    "integrations",
    "orthogonalize",
    "param_groups",
    "polar_svd",
    "theory",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'muonkit' has no attribute {name!r}")
