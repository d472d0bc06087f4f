"""Constrained tuning of the kind that produced Jordan's (3.4445, -4.7750, 2.0315).

Problem: for one odd polynomial ``f`` of a given degree repeated ``k`` times, maximise the slope at
zero ``a`` (small singular values grow like ``a^k``) subject to

    1 - eps <= phi(x) <= 1 + eps   for every x in [x_lo, 1]

(phi = f composed k times). ``eps`` about 0.3 reproduces the behaviour Jordan describes: singular values
are not driven to 1, only into a band around it, which costs nothing in training and buys speed.

Method: for a given ``a`` the remaining coefficients minimise the worst deviation
``W = max |phi(x) - 1|`` (Nelder-Mead, restarted, warm-started from the previous ``a``); ``a`` itself is
found by bisection on feasibility ``min W <= eps``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .polynomials import compose, log_grid

__all__ = ["TuneResult", "flat_start", "nelder_mead", "tune", "worst_deviation"]


def worst_deviation(row: tuple[float, ...], steps: int, xs: np.ndarray) -> float:
    """``max_x |phi(x) - 1|`` (``inf`` if the iteration overflows)."""
    phi = compose([row] * steps, xs)
    dev = np.max(np.abs(phi - 1.0))
    return float(dev) if np.isfinite(dev) else float("inf")


def nelder_mead(
    fun: Callable[[np.ndarray], float], x0: np.ndarray, step: float = 0.5, iters: int = 400, tol: float = 1e-10
) -> tuple[np.ndarray, float]:
    """Minimise ``fun`` from ``x0`` by the Nelder-Mead simplex (standard coefficients 1, 2, 0.5, 0.5)."""
    n = x0.size
    simplex = [x0.astype(float)] + [x0 + step * np.eye(n)[i] for i in range(n)]
    values = [fun(p) for p in simplex]
    for _ in range(iters):
        order = np.argsort(values)
        simplex = [simplex[i] for i in order]
        values = [values[i] for i in order]
        if abs(values[-1] - values[0]) < tol and np.max(np.abs(simplex[-1] - simplex[0])) < tol:
            break
        centroid = np.mean(simplex[:-1], axis=0)
        reflected = centroid + (centroid - simplex[-1])
        fr = fun(reflected)
        if fr < values[0]:
            expanded = centroid + 2.0 * (centroid - simplex[-1])
            fe = fun(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = centroid + 0.5 * (simplex[-1] - centroid)
            fc = fun(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:
                simplex = [simplex[0] + 0.5 * (p - simplex[0]) for p in simplex]
                values = [fun(p) for p in simplex]
    best = int(np.argmin(values))
    return simplex[best], float(values[best])


@dataclass(frozen=True)
class TuneResult:
    row: tuple[float, ...]
    degree: int
    steps: int
    eps: float
    x_lo: float
    worst_deviation: float

    @property
    def a(self) -> float:
        return self.row[0]


def flat_start(a: float, n_rest: int) -> np.ndarray:
    """Higher coefficients making ``f(1) = 1`` and ``f^(j)(1) = 0`` for ``j = 1 .. n_rest - 1`` (a polynomial that
    saturates at 1; for degree 5 this gives b = (5 - 4a)/2, c = (2a - 3)/2, near Jordan's shape)."""

    # d^j/dx^j x^(2i+1) at x = 1 is the falling factorial (2i+1)_j.
    def falling(p: int, j: int) -> float:
        out = 1.0
        for t in range(j):
            out *= p - t
        return out

    M = np.array([[falling(2 * i + 1, j) for i in range(1, n_rest + 1)] for j in range(n_rest)])
    rhs = np.array([1.0 - a] + [-a * falling(1, j) for j in range(1, n_rest)])
    return np.linalg.solve(M, rhs)


def _best_rest(a: float, start: np.ndarray, steps: int, xs: np.ndarray, restarts: int, rng: np.random.Generator):
    fun = lambda rest: worst_deviation((a, *rest), steps, xs)
    best_x, best_v = nelder_mead(fun, start, step=0.3)
    flat_x, flat_v = nelder_mead(fun, flat_start(a, start.size), step=0.3)
    if flat_v < best_v:
        best_x, best_v = flat_x, flat_v
    for _ in range(restarts):
        x, v = nelder_mead(fun, best_x + rng.normal(scale=0.5, size=best_x.size), step=0.3)
        if v < best_v:
            best_x, best_v = x, v
    return best_x, best_v


def tune(
    degree: int = 5,
    steps: int = 5,
    eps: float = 0.3,
    x_lo: float = 1e-3,
    a_bounds: tuple[float, float] = (1.0, 12.0),
    tol: float = 1e-4,
    restarts: int = 2,
    seed: int = 0,
) -> TuneResult:
    """Largest slope at zero ``a`` whose best polynomial keeps ``phi`` within ``1 +- eps`` on ``[x_lo, 1]``.

    Raises ``ValueError`` if no polynomial is feasible (e.g. ``x_lo`` too small for ``steps`` steps:
    ``a^k x_lo`` must reach ``1 - eps``). The search is heuristic (simplex with restarts); it never
    returns less than the same search at degree ``d - 2`` (padded with a zero coefficient).
    """
    if degree < 3 or degree % 2 == 0:
        raise ValueError(f"degree must be odd and >= 3, got {degree}")
    if steps < 1 or not 0 < eps < 1 or not 0 < x_lo < 1:
        raise ValueError("need steps >= 1, 0 < eps < 1 and 0 < x_lo < 1")
    # The optimiser works on a coarse grid; every accept/reject decision is re-checked on a dense one,
    # since compositions of many steps have narrow spikes that a coarse grid can miss.
    xs = np.concatenate([log_grid(x_lo, 1.0, 600), [1.0]])
    dense = np.concatenate([log_grid(x_lo, 1.0, 20001), [1.0]])
    rng = np.random.default_rng(seed)
    n_rest = degree // 2

    def feasible(a: float, start: np.ndarray) -> tuple[np.ndarray, float]:
        r, v = _best_rest(a, start, steps, xs, restarts, rng)
        return r, max(v, worst_deviation((a, *r), steps, dense))

    def result(a: float, r: np.ndarray, v: float) -> TuneResult:
        return TuneResult((a, *map(float, r)), degree, steps, eps, x_lo, v)

    def bisect_up(lo: float, rest: np.ndarray, best: TuneResult, hi: float) -> TuneResult:
        while hi - lo > tol:
            mid = 0.5 * (lo + hi)
            r, v = feasible(mid, rest)
            if v <= eps:
                lo, rest, best = mid, r, result(mid, r, v)
            else:
                hi = mid
        return best

    # The feasible a form an interval: below it a^steps * x_lo cannot reach the band, above it the
    # polynomial overshoots. Scan upward (warm-starting the other coefficients) to the last feasible a.
    a_min = max(a_bounds[0], ((1 - eps) / x_lo) ** (1.0 / steps))
    rest = flat_start(a_min, n_rest)
    best: TuneResult | None = None
    closest = float("inf")
    lo = hi = a_bounds[1]
    for t in np.linspace(0.0, 1.0, 30)[1:]:  # dense near a_min: the feasible interval can be narrow
        a = float(a_min + (a_bounds[1] - a_min) * t**3)
        r, v = feasible(a, rest)
        closest = min(closest, v)
        if v <= eps:
            rest, lo, best = r, a, result(a, r, v)
        elif best is not None:
            hi = a
            break
    if best is not None:
        if hi == lo:
            raise ValueError(f"a = {lo} is still feasible; raise a_bounds[1]")
        best = bisect_up(lo, rest, best, hi)
    # A degree-(d-2) solution is a degree-d polynomial with a zero top coefficient: never do worse than it.
    if degree > 3:
        try:
            lower = tune(degree - 2, steps, eps, x_lo, a_bounds, tol, restarts, seed)
        except ValueError:
            lower = None
        if lower is not None and (best is None or lower.a > best.a):
            padded = np.array([*lower.row[1:], 0.0])
            best = bisect_up(lower.a, padded, result(lower.a, padded, lower.worst_deviation), a_bounds[1])
    if best is None:
        raise ValueError(
            f"no degree-{degree} polynomial keeps {steps} steps within 1 +- {eps} on [{x_lo:g}, 1] "
            f"(closest worst-deviation {closest:.3f}); raise x_lo, steps or eps"
        )
    return best
