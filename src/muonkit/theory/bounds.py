"""Theorem 1 (NS-Muon / SVD-Muon) and Theorem 3 (SGD with momentum) of Kim & Oh (arXiv 2601.19156),
as functions of the problem constants.

Measure: ``(1/T) sum_t E ||grad f(W_{t-1})||_*`` (nuclear norm). Constants: ``L`` (smoothness,
``||grad f(X) - grad f(Y)||_* <= L ||X - Y||_op``), ``D = f(W_0) - f*``, ``sigma^2`` (gradient noise,
``E ||g - grad f||_F^2 <= sigma^2`` per sample), ``B`` (batch), ``r = min(m, n)``, ``T`` (steps).

Theorem 1 with ``eta = sqrt((1 - beta) D / (T L))`` and ``beta = 1 - min(sqrt(L D B) / (sigma sqrt(r T)), 1)``.
The bound computed here is App. B's *before* beta is substituted (re-derived from the proof's terms: the
``D / (eta T)`` term, the momentum bias and variance terms, and the ``1/(1 - beta)`` tail)::

    1/(1-eps) [ sqrt(L D / T) ( (1 + 2 beta (1+eps)) / sqrt(1-beta) + (1+eps)^2 sqrt(1-beta) / 2 )
                + 2 sigma sqrt(r / B) sqrt((1-beta) / (1+beta))
                + 2 beta sqrt(2 r L D) / (T (1-beta)) ]

With ``1 - beta = sqrt(L D B) / (sigma sqrt(r T))`` substituted it is the paper's eq. (8)::

    1/(1-eps) [ (1+eps)^2 sqrt(1-beta)/2 sqrt(L D / T)
                + (1 + 2 beta (1+eps) + 2/sqrt(1+beta)) (r sigma^2 L D / (B T))^(1/4)
                + 2 sqrt(2) beta sigma r / sqrt(B T) ]

but where beta is clipped to 0 (``sqrt(L D B) >= sigma sqrt(r T)``, e.g. sigma = 0) eq. (8) loses the
``sqrt(L D / T) / sqrt(1-beta)`` term and is no bound: deterministic SVD-Muon on ``||W - W*||_F^2 / 2`` (8 x 32, equal
singular values, T = 400) has mean nuclear gradient 0.4242, eq. (8) gives 0.1414, the form above 0.4243
(``tests/test_theory.py``). ``eq8_as_printed`` keeps the printed form for comparison.

SVD-Muon is ``eps = 0``. Theorem 3 is stated as ``O(sqrt(r L D / T) + (r^2 sigma^2 L D / (B T))^(1/4))``;
its constants are not given there, so ``sgd_momentum_rate`` uses 1 for both: use it for shapes and ratios
(the ``sqrt(r)`` and ``r^(1/4)`` factors), not as a numerical bound.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import inf, isfinite, sqrt

__all__ = ["MuonBound", "eq8_as_printed", "muon_bound", "muon_hyperparameters", "rank_gap", "sgd_momentum_rate"]


def muon_hyperparameters(L: float, D: float, sigma: float, B: int, r: int, T: int) -> tuple[float, float]:
    """Theorem 1's ``(eta, beta)``."""
    _check(L, D, sigma, B, r, T)
    beta = 0.0 if sigma == 0 else 1.0 - min(sqrt(L * D * B) / (sigma * sqrt(r * T)), 1.0)
    return sqrt((1.0 - beta) * D / (T * L)), beta


@dataclass(frozen=True)
class MuonBound:
    eta: float
    beta: float
    eps: float
    deterministic: float
    noise_quartic: float
    noise_linear: float
    total: float

    def to_dict(self) -> dict:
        return asdict(self)


def muon_bound(L: float, D: float, sigma: float, B: int, r: int, T: int, eps: float = 0.0) -> MuonBound:
    """Theorem 1's explicit bound for an orthogonaliser with polar error ``eps`` (0: SVD-Muon), before beta is
    substituted (see the module docstring): a bound for clipped beta too. ``deterministic`` collects the
    ``sqrt(L D / T)`` terms, ``noise_quartic`` the ``sigma sqrt(r / B)`` term (the paper's ``(r sigma^2 L D /
    (B T))^(1/4)`` terms where beta is not clipped), ``noise_linear`` the ``1 / (T (1 - beta))`` term."""
    eta, beta = muon_hyperparameters(L, D, sigma, B, r, T)
    if not eps >= 0:
        raise ValueError("eps must be >= 0")
    if eps >= 1:
        return MuonBound(eta, beta, eps, inf, inf, inf, inf)
    base = sqrt(L * D / T)
    det = base * ((1 + 2 * beta * (1 + eps)) / sqrt(1 - beta) + (1 + eps) ** 2 * sqrt(1 - beta) / 2)
    quartic = 2 * sigma * sqrt(r / B) * sqrt((1 - beta) / (1 + beta))
    linear = 2 * beta * sqrt(2 * r * L * D) / (T * (1 - beta))
    return MuonBound(
        eta, beta, eps, det / (1 - eps), quartic / (1 - eps), linear / (1 - eps), (det + quartic + linear) / (1 - eps)
    )


def eq8_as_printed(L: float, D: float, sigma: float, B: int, r: int, T: int, eps: float = 0.0) -> float:
    """App. B, eq. (8) as printed (beta substituted): equal to ``muon_bound`` where beta is not clipped, below the
    measured rate where it is (module docstring). For comparison only."""
    _, beta = muon_hyperparameters(L, D, sigma, B, r, T)
    if eps >= 1:
        return inf
    det = (1 + eps) ** 2 * sqrt(1 - beta) / 2 * sqrt(L * D / T)
    quartic = (1 + 2 * beta * (1 + eps) + 2 / sqrt(1 + beta)) * (r * sigma**2 * L * D / (B * T)) ** 0.25
    linear = 2 * sqrt(2) * beta * sigma * r / sqrt(B * T)
    return (det + quartic + linear) / (1 - eps)


def sgd_momentum_rate(L: float, D: float, sigma: float, B: int, r: int, T: int) -> dict[str, float]:
    """Theorem 3's rate with unit constants.

    Deterministic term ``sqrt(r L D / T)``, noise term ``(r^2 sigma^2 L D / (B T))^(1/4)``.
    """
    _check(L, D, sigma, B, r, T)
    det = sqrt(r * L * D / T)
    noise = (r**2 * sigma**2 * L * D / (B * T)) ** 0.25
    return {"deterministic": det, "noise": noise, "total": det + noise}


def rank_gap(L: float, D: float, sigma: float, B: int, r: int, T: int) -> dict[str, float]:
    """SGD-M's rate terms over Muon's (unit constants on both): ``sqrt(r)`` and ``r^(1/4)``."""
    sgd = sgd_momentum_rate(L, D, sigma, B, r, T)
    muon_det = sqrt(L * D / T)
    muon_noise = (r * sigma**2 * L * D / (B * T)) ** 0.25
    return {
        "deterministic_ratio": sgd["deterministic"] / muon_det,
        "noise_ratio": sgd["noise"] / muon_noise if muon_noise > 0 else float("nan"),
    }


def _check(L: float, D: float, sigma: float, B: int, r: int, T: int) -> None:
    finite = all(isfinite(v) for v in (L, D, sigma, B, r, T))
    if not finite or L <= 0 or D < 0 or sigma < 0 or B < 1 or r < 1 or T < 1:
        raise ValueError(f"need finite L > 0, D >= 0, sigma >= 0, B >= 1, r >= 1, T >= 1; got {(L, D, sigma, B, r, T)}")
