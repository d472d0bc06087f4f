"""muonkit: the Muon optimizer, Newton-Schulz orthogonalization and the tools to understand them.

groups = muonkit.param_groups(model)   # hidden matrices -> Muon; embeddings, head, 1-D -> AdamW
opt = muonkit.Muon(groups, lr=0.02, weight_decay=0.01)
O = muonkit.orthogonalize(G)           # approximate polar factor, batched over leading dims
"""

from . import coefficients, cuda_graphs, fused
from .monitor import StatsLogger
from .newton_schulz import orthogonalize
from .optim import Muon, NonFiniteGradientError, classify, describe, param_groups
from .qk_clip import QKClip
from .reference import polar_svd

__version__ = "0.1.0"
__all__ = [
    "Muon",
    "NonFiniteGradientError",
    "QKClip",
    "StatsLogger",
    "__version__",
    "classify",
    "coefficients",
    "cuda_graphs",
    "describe",
    "fused",
    "orthogonalize",
    "param_groups",
    "polar_svd",
]
