"""The NS-Muon convergence constant of Kim & Oh, "Convergence of Muon with Newton-Schulz" (arXiv 2601.19156).

Setting (their Section 3): the momentum is scaled so its singular values lie in ``[l, 1]``; ``q`` NS steps
with the polynomial ``x p_kappa(x^2)`` (``p_kappa``: Taylor truncation of ``lambda^(-1/2)`` at 1, odd
degree ``2 kappa + 1``) follow. With ``delta = ||P - X X^T||_op`` (``P``: the projector onto the range of the
momentum, ``I`` where it has full row rank; ``matrix_delta``) and ``delta_0 = 1 - l^2``:

* residual map ``delta_{j+1} = phi(delta_j)``, ``phi(u) = 1 - (1 - u) p_kappa(1 - u)^2``
  (kappa = 1: ``u^2 (3 + u) / 4``; kappa = 2: ``u^3 (40 + 15 u + 9 u^2) / 64``). Evaluated as
  ``u^(kappa+1) h_kappa(u)`` with ``h_kappa``'s exact coefficients (all positive, ``residual_factor``): the printed
  form cancels to nothing below ``u ~ 1e-16`` in float64, this one keeps full relative precision down to
  float64's smallest normal numbers;
* Theorem 2: ``delta_q <= delta_0^((kappa + 1)^q)``; the distance to the polar factor is
  ``epsilon_q = 1 - sqrt(1 - delta_q)`` and the constant in Theorem 1 is ``chi_q = 1 / (1 - epsilon_q)``;
  the explicit bound (App. B) carries the stricter ``(1 + eps)^2 / (1 - eps)``.

Theorem 1 uses only ``epsilon < 1``, so any orthogonaliser with a measured ``epsilon`` gets a constant:
``schedule_epsilon`` measures it for any schedule as ``max |1 - phi(sigma)|`` over ``sigma in [l, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from functools import cache
from math import comb, inf, sqrt

import numpy as np

from ..design.polynomials import as_rows, compose, derivative, evaluate, log_grid, taylor_row

__all__ = [
    "chi",
    "chi_excess",
    "chi_strict",
    "epsilon_from_delta",
    "matrix_delta",
    "p_kappa",
    "residual_bound",
    "residual_factor",
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


@cache
def residual_factor(kappa: int) -> tuple[Fraction, ...]:
    """Coefficients ``(h_0, h_1, ...)`` of ``h_kappa`` with ``phi(u) = u^(kappa+1) h_kappa(u)``, exact.

    With ``P(u) = sum_{s<=kappa} c_s u^s`` (so ``p_kappa(1 - u) = P(u)``), ``phi(u) = 1 - (1 - u) P(u)^2``; the
    series of ``(1 - u)^(-1/2)`` is ``sum_s c_s u^s``, so the coefficients of ``u^0 .. u^kappa`` vanish and the
    rest are those of ``h``."""
    c = [Fraction(comb(2 * s, s), 4**s) for s in range(kappa + 1)]
    square = [sum((c[i] * c[k - i] for i in range(max(0, k - kappa), min(k, kappa) + 1)), Fraction(0))
              for k in range(2 * kappa + 1)]  # fmt: skip
    q = [Fraction(0)] * (2 * kappa + 2)  # 1 - (1 - u) P(u)^2
    q[0] = Fraction(1)
    for k, a in enumerate(square):
        q[k] -= a
        q[k + 1] += a
    if any(q[: kappa + 1]):
        raise AssertionError(f"phi has low-order terms for kappa = {kappa}: {q[: kappa + 1]}")
    return tuple(q[kappa + 1 :])


def residual_map(kappa: int, u: np.ndarray | float) -> np.ndarray:
    """``phi(u) = 1 - (1 - u) p_kappa(1 - u)^2``: how ``delta = 1 - sigma^2`` shrinks in one step; computed as
    ``u^(kappa+1) h_kappa(u)`` (``residual_factor``), free of cancellation for small ``u``."""
    u = np.asarray(u, dtype=np.float64)
    h = np.polyval([float(a) for a in reversed(residual_factor(kappa))], u)
    return u ** (kappa + 1) * h


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
    """``epsilon = 1 - sqrt(1 - delta)``: the polar-factor distance when ``||P - X X^T|| = delta``; computed as
    ``delta / (1 + sqrt(1 - delta))``, which keeps its relative precision for tiny ``delta``."""
    delta = min(max(float(delta), 0.0), 1.0)
    return delta / (1.0 + sqrt(1.0 - delta))


def chi(eps: float) -> float:
    """``chi = 1 / (1 - epsilon)``, the factor by which NS-Muon's bound exceeds SVD-Muon's (inf if eps >= 1)."""
    return inf if eps >= 1 else 1.0 / (1.0 - eps)


def chi_excess(eps: float) -> float:
    """``chi - 1 = epsilon / (1 - epsilon)``, which float64 keeps where ``chi`` itself rounds to 1."""
    return inf if eps >= 1 else eps / (1.0 - eps)


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
        "chi_excess": chi_excess(exact),
        "chi_excess_bound": chi_excess(bound),
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


def matrix_delta(X: np.ndarray, M: np.ndarray, rtol: float = 1e-10) -> float:
    """``||P - X X^T||_op`` for an NS output ``X`` of the momentum ``M`` (both ``m x n``, ``m <= n``; transpose
    tall ones first), ``P`` the projector onto ``M``'s column space: Kim & Oh's residual, which for a momentum of
    full row rank is ``||I - X X^T||_op`` and for a rank-deficient one ignores the null directions that NS (an odd
    polynomial) leaves at 0. ``rtol``: singular values of ``M`` below ``rtol`` times its largest count as 0."""
    X, M = np.asarray(X, dtype=np.float64), np.asarray(M, dtype=np.float64)
    U, S, _ = np.linalg.svd(M, full_matrices=False)
    Ur = U[:, rtol * (S[0] if S.size else 0.0) < S]
    return float(np.linalg.norm(Ur @ Ur.T - X @ X.T, ord=2))
