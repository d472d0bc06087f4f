"""Per-step minimax design: the Polar Express (Amsel, Persson, Musco & Gower 2025, arXiv 2505.16932).

If the singular values lie in ``[l_t, u_t]``, the best next polynomial minimises
``max_{x in [l_t, u_t]} |1 - p(x)|`` over odd ``p`` of the given degree; greedily repeating this is
optimal for the composition. The new singular values lie in ``[min p, max p] = [1 - E, 1 + E]`` over
``[l_t, u_t]``, so ``l_{t+1} = 1 - E``, ``u_{t+1} = 2 - l_{t+1}`` (for degree 5, ``min p = p(l_t)``).

Each minimax polynomial is found by the Remez exchange: with ``k`` coefficients, solve
``p(x_i) + (-1)^i E = 1`` on ``k + 1`` points (``l``, the ``k - 1`` interior extrema, ``u``), move the
interior points to the extrema of the new ``p`` (roots of ``p'``, a polynomial in ``x^2``), repeat.

Two stabilisers from the paper: the *cushion* optimises on ``[max(l_t, lambda u_t), u_t]`` (so no step
tries too hard on tiny singular values) and then rescales ``p`` so that its range on ``[l_t, u_t]`` is
centred on 1, ``min p + max p = 2`` (the paper writes ``p(l_t) + p(u_t) = 2``, the same for degree 5;
its lambda was chosen for degree 5 and is used for every degree here unless given);
the *safety* factor replaces ``p(x)`` by ``p(x / 1.01)`` in every step but the last, leaving room for
rounding in low precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .polynomials import evaluate, taylor_row

__all__ = ["CUSHION", "SAFETY", "MinimaxSchedule", "minimax_polynomial", "polar_express"]

CUSHION = 0.02407327424182761  # the paper's lambda for degree 5
SAFETY = 1.01


def minimax_polynomial(l: float, u: float, degree: int = 5, tol: float = 1e-15, max_iter: int = 200):
    """Odd polynomial of ``degree`` minimising ``max_{[l, u]} |1 - p|``; returns ``(row, error)``."""
    if degree < 3 or degree % 2 == 0:
        raise ValueError(f"degree must be odd and >= 3, got {degree}")
    if not 0 < l <= u:
        raise ValueError(f"need 0 < l <= u, got l={l}, u={u}")
    k = (degree + 1) // 2
    if l / u >= 1 - 5e-6:  # interval too thin to solve for: the limit is the Taylor polynomial at u
        row = taylor_row(k - 1)
        return tuple(c / u ** (2 * i + 1) for i, c in enumerate(row)), 0.0
    points = np.array([l] + [l + (u - l) * (2 * i - 1) / (2 * (k - 1)) for i in range(1, k)] + [u])
    signs = (-1.0) ** np.arange(k + 1)
    powers = 2 * np.arange(k) + 1
    E_old = np.inf
    for _ in range(max_iter):
        M = np.column_stack([points[:, None] ** powers[None, :], signs])
        sol = np.linalg.solve(M, np.ones(k + 1))
        coeffs, E = sol[:k], sol[k]
        # interior extrema: roots in (l^2, u^2) of p'(x) = sum_i (2i+1) c_i y^i with y = x^2
        y = np.roots((powers * coeffs)[::-1])
        y = np.sort(y[(np.abs(y.imag) < 1e-12) & (y.real > l * l) & (y.real < u * u)].real)
        if y.size != k - 1:
            break
        points = np.concatenate([[l], np.sqrt(y), [u]])
        if abs(E_old - E) <= tol:
            break
        E_old = E
    return tuple(float(c) for c in coeffs), float(abs(E))


def _range_on(row: tuple[float, ...], l: float, u: float) -> tuple[float, float]:
    """Exact ``(min, max)`` of the odd polynomial on ``[l, u]``: end points and interior critical points."""
    powers = 2 * np.arange(len(row)) + 1
    y = np.roots((powers * np.asarray(row))[::-1])
    y = y[(np.abs(y.imag) < 1e-12) & (y.real > l * l) & (y.real < u * u)].real
    values = evaluate(row, np.concatenate([[l, u], np.sqrt(y)]))
    return float(values.min()), float(values.max())


@dataclass(frozen=True)
class MinimaxSchedule:
    raw_rows: tuple[tuple[float, ...], ...]  # before the safety factor (the paper's printed table)
    rows: tuple[tuple[float, ...], ...]  # what to run: safety applied to all rows but the last
    lower: tuple[float, ...]  # l_t before each step, then after the last
    upper: tuple[float, ...]

    @property
    def final_error(self) -> float:
        """Guaranteed ``max |1 - sigma|`` after the schedule, for inputs in ``[l_0, 1]`` (no safety)."""
        return 1.0 - self.lower[-1]


def polar_express(
    degree: int = 5, steps: int = 8, l: float = 1e-3, cushion: float = CUSHION, safety: float = SAFETY
) -> MinimaxSchedule:
    """Greedy per-step minimax schedule for singular values in ``[l, 1]``."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if not 0 < l < 1:
        raise ValueError(f"need 0 < l < 1, got {l}")
    if not 0 <= cushion < 1 or safety < 1:
        raise ValueError("need 0 <= cushion < 1 and safety >= 1")
    u = 1.0
    lower, upper, raw = [l], [u], []
    for _ in range(steps):
        row, _ = minimax_polynomial(max(l, cushion * u), u, degree)
        lo, hi = _range_on(row, l, u)
        scale = 2.0 / (lo + hi)
        row = tuple(c * scale for c in row)
        raw.append(row)
        l, u = scale * lo, scale * hi
        lower.append(l)
        upper.append(u)
    scaled = [tuple(c / safety ** (2 * i + 1) for i, c in enumerate(r)) for r in raw[:-1]] + [raw[-1]]
    return MinimaxSchedule(tuple(raw), tuple(scaled), tuple(lower), tuple(upper))
