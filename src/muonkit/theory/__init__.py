"""Kim & Oh's convergence theory of Muon with Newton-Schulz, made executable (float64, CPU).

``constants``: p_kappa, the residual map, epsilon_q and chi_q (for the paper's polynomials and for any
schedule); ``bounds``: Theorem 1 and Theorem 3; ``experiments``: checks of the claims (JSON + PNG).
"""

from .bounds import MuonBound, eq8_as_printed, muon_bound, muon_hyperparameters, rank_gap, sgd_momentum_rate
from .constants import (
    chi,
    chi_excess,
    chi_strict,
    epsilon_from_delta,
    matrix_delta,
    p_kappa,
    residual_bound,
    residual_factor,
    residual_iterates,
    residual_map,
    schedule_epsilon,
    taylor_epsilon,
)

__all__ = [
    "MuonBound",
    "chi",
    "chi_excess",
    "chi_strict",
    "epsilon_from_delta",
    "eq8_as_printed",
    "matrix_delta",
    "muon_bound",
    "muon_hyperparameters",
    "p_kappa",
    "rank_gap",
    "residual_bound",
    "residual_factor",
    "residual_iterates",
    "residual_map",
    "schedule_epsilon",
    "sgd_momentum_rate",
    "taylor_epsilon",
]
