"""The NS-Muon convergence constant of Kim & Oh, "Convergence of Muon with Newton-Schulz" (arXiv 2601.19156).

Setting (their Section 3): the momentum is scaled so its singular values lie in ``[l, 1]``; ``q`` NS steps
with the polynomial ``x p_kappa(x^2)`` (``p_kappa``: Taylor truncation of ``lambda^(-1/2)`` at 1, odd
degree ``2 kappa + 1``) follow. With ``delta = ||I - X X^T||_op`` and ``delta_0 = 1 - l^2``:

* residual map ``delta_{j+1} = phi(delta_j)``, ``phi(u) = 1 - (1 - u) p_kappa(1 - u)^2``
  (kappa = 1: ``u^2 (3 + u) / 4``; kappa = 2: ``u^3 (40 + 15 u + 9 u^2) / 64``);
* Theorem 2: ``delta_q <= delta_0^((kappa + 1)^q)``; the distance to the polar factor is
  ``epsilon_q = 1 - sqrt(1 - delta_q)`` and the constant in Theorem 1 is ``chi_q = 1 / (1 - epsilon_q)``;
  the explicit bound (App. B) carries the stricter ``(1 + eps)^2 / (1 - eps)``.

Theorem 1 uses only ``epsilon < 1``, so any orthogonaliser with a measured ``epsilon`` gets a constant:
``schedule_epsilon`` measures it for any schedule as ``max |1 - phi(sigma)|`` over ``sigma in [l, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import inf, sqrt

import numpy as np

from ..design.polynomials import as_rows, compose, derivative, evaluate, log_grid, taylor_row

__all__ = [
    "chi",
    "chi_strict",
    "epsilon_from_delta",
    "p_kappa",
    "residual_bound",
    "residual_iterates",
    "residual_map",
    "schedule_epsilon",
    "taylor_epsilon",
]


def p_kappa(kappa: int, lam: np.ndarray | float) -> np.ndarray:
    """``p_kappa(lambda) = sum_{s=0..kappa} c_s (1 - lambda)^s``, ``c_s = (2s)! / (4^s (s!)^2)``."""
    lam = np.asarray(lam, dtype=np.float64)
    row = taylor_row(kappa)  # x p(x^2) = sum_i row[i] x^(2i+1), so p(lambda) = sum_i row[i] lambda^i
    return np.polyval(list(reversed(row)), lam)


def residual_map(kappa: int, u: np.ndarray | float) -> np.ndarray:
    """``phi(u) = 1 - (1 - u) p_kappa(1 - u)^2``: how ``delta = 1 - sigma^2`` shrinks in one step."""
    u = np.asarray(u, dtype=np.float64)
    return 1.0 - (1.0 - u) * p_kappa(kappa, 1.0 - u) ** 2


def residual_iterates(kappa: int, q: int, l: float) -> np.ndarray:
    """Exact ``delta_0 .. delta_q`` from ``delta_0 = 1 - l^2``."""
    deltas = [1.0 - l * l]
    for _ in range(q):
        deltas.append(float(residual_map(kappa, deltas[-1])))
    return np.array(deltas)


def residual_bound(kappa: int, q: int, l: float) -> float:
    """Theorem 2: ``delta_q <= delta_0^((kappa + 1)^q)``."""
    return float((1.0 - l * l) ** ((kappa + 1) ** q))


def epsilon_from_delta(delta: float) -> float:
    """``epsilon = 1 - sqrt(1 - delta)``: the polar-factor distance when ``||I - X X^T|| = delta``."""
    return 1.0 - sqrt(max(0.0, 1.0 - delta))


def chi(eps: float) -> float:
    """``chi = 1 / (1 - epsilon)``, the factor by which NS-Muon's bound exceeds SVD-Muon's (inf if eps >= 1)."""
    return inf if eps >= 1 else 1.0 / (1.0 - eps)


def chi_strict(eps: float) -> float:
    """The explicit bound's ``(1 + eps)^2 / (1 - eps)``."""
    return inf if eps >= 1 else (1.0 + eps) ** 2 / (1.0 - eps)


def taylor_epsilon(kappa: int, q: int, l: float) -> dict[str, float]:
    """``epsilon_q`` and ``chi_q`` for the paper's ``p_kappa``: exact iterates and Theorem 2's bound."""
    exact = epsilon_from_delta(residual_iterates(kappa, q, l)[-1])
    bound = epsilon_from_delta(residual_bound(kappa, q, l))
    return {
        "kappa": kappa,
        "q": q,
        "l": l,
        "epsilon": exact,
        "epsilon_bound": bound,
        "chi": chi(exact),
        "chi_bound": chi(bound),
        "chi_strict": chi_strict(exact),
    }


def schedule_epsilon(rows: Sequence[Sequence[float]] | Sequence[float], l: float, n: int = 20001) -> dict[str, float]:
    """``epsilon = max |1 - phi(sigma)|`` over ``sigma in [l, 1]`` for any schedule, and its ``chi``.

    ``converges_to_1`` says whether repeating the schedule's last row has 1 as an attracting fixed point,
    i.e. whether more steps would drive ``epsilon`` to 0. It is False for Jordan's quintic (``f(1) = 0.701``):
    its ``chi`` stays bounded away from 1 however many steps are taken.
    """
    rows = as_rows(rows)
    xs = np.concatenate([log_grid(l, 1.0, n), [l, 1.0]])
    phi = compose(rows, xs)
    eps = float(np.max(np.abs(1.0 - phi))) if np.all(np.isfinite(phi)) else inf
    last = rows[-1]
    attracting = abs(float(evaluate(last, 1.0)) - 1.0) < 1e-6 and abs(float(derivative(last, 1.0))) < 1.0
    return {"epsilon": eps, "chi": chi(eps), "chi_strict": chi_strict(eps), "converges_to_1": attracting}
