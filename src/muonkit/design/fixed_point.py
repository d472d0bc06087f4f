"""Fixed-point design of Newton-Schulz polynomials (Bernstein & Newhouse 2024; Jordan 2024).

Repeating one odd polynomial ``f`` drives every singular value in its basin to an attracting fixed
point. Designing for a fixed point at 1 asks ``f(1) = 1`` and ``|f'(1)| < 1``; the slope at zero,
``a = f'(0)``, sets how fast small singular values grow (``phi'(0) = a^k`` after k steps).

* Cubic family ``f = a x + (1 - a) x^3``: ``f'(1) = 3 - 2a``, so 1 is attracting exactly for ``1 < a < 2``.
* Quintic family with ``f(1) = 1`` (``c = 1 - a - b``): ``f'(1) = 5 - 4a - 2b``, attracting exactly for
  ``2 - 2a < b < 3 - 2a``. Jordan's line ``b = 2.99 - 2a, c = a - 1.99`` keeps ``f'(1) = -0.98``
  for every ``a``; raising ``a`` raises the hump of ``f`` to the right of its peak until some ``x`` in
  ``(0, 1]`` is thrown past the right edge of the basin, after which the iteration diverges.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from .polynomials import compose, derivative, evaluate, log_grid

__all__ = [
    "FixedPointReport",
    "analyse",
    "basin_upper_edge",
    "converges_on_unit_interval",
    "cubic_attracting_range",
    "cubic_family",
    "largest_convergent_a",
    "quintic_attracting_b_range",
    "quintic_family",
    "quintic_line",
]

ITERS = 1000  # long enough for |f'(1)| = 0.98 to settle (0.98^1000 ~ 2e-9)
TOL = 0.05


def cubic_family(a: float) -> tuple[float, float]:
    """The cubic with ``f(1) = 1`` and slope ``a`` at 0: ``(a, 1 - a)``."""
    return (float(a), 1.0 - float(a))


def quintic_family(a: float, b: float) -> tuple[float, float, float]:
    """The quintic with ``f(1) = 1``: ``(a, b, 1 - a - b)``."""
    return (float(a), float(b), 1.0 - float(a) - float(b))


def quintic_line(a: float, slope_at_one: float = -0.98) -> tuple[float, float, float]:
    """Jordan's one-parameter line: ``f(1) = 1`` and ``f'(1) = slope_at_one`` (default gives b = 2.99 - 2a).

    From ``5 - 4a - 2b = s``: ``b = (5 - s)/2 - 2a``; with s = -0.98, ``b = 2.99 - 2a``, ``c = a - 1.99``.
    """
    b = (5.0 - slope_at_one) / 2.0 - 2.0 * a
    return quintic_family(a, b)


def quintic_attracting_b_range(a: float) -> tuple[float, float]:
    """Open interval of ``b`` for which 1 is an attracting fixed point of ``quintic_family(a, b)``."""
    return (2.0 - 2.0 * a, 3.0 - 2.0 * a)


def converges_on_unit_interval(row: Sequence[float], x_lo: float = 1e-6, iters: int = ITERS, tol: float = TOL) -> bool:
    """Whether repeating ``row`` takes every ``x`` in ``[x_lo, 1]`` to within ``tol`` of 1 (and stays finite)."""
    end = compose([tuple(row)] * iters, log_grid(x_lo, 1.0, 2001))
    return bool(np.all(np.isfinite(end)) and np.max(np.abs(end - 1.0)) < tol)


def basin_upper_edge(
    row: Sequence[float], x_max: float = 3.0, n: int = 20001, iters: int = ITERS, tol: float = TOL
) -> float:
    """Smallest ``x >= 1`` whose iterates do not converge to 1 (``x_max`` if all up to it do)."""
    xs = np.linspace(1.0, x_max, n)
    end = compose([tuple(row)] * iters, xs)
    ok = np.isfinite(end) & (np.abs(end - 1.0) < tol)
    return float(x_max if ok.all() else xs[np.argmin(ok)])


@dataclass(frozen=True)
class FixedPointReport:
    row: tuple[float, ...]
    f_at_1: float
    slope_at_1: float
    fixed_at_1: bool
    attracting: bool
    slope_at_0: float
    max_on_unit: float  # max of f on (0, 1]
    basin_upper_edge: float  # iterates of x in [1, edge) converge to 1
    converges_on_unit: bool  # every x in [1e-6, 1] converges to 1

    def phi_slope_at_0(self, steps: int) -> float:
        """``phi'(0) = a^k`` for ``k`` repetitions."""
        return self.slope_at_0**steps

    def to_dict(self) -> dict:
        return asdict(self)


def analyse(row: Sequence[float]) -> FixedPointReport:
    """Fixed-point facts of repeating one polynomial ``row``."""
    row = tuple(float(v) for v in row)
    f1 = float(evaluate(row, 1.0))
    d1 = float(derivative(row, 1.0))
    fixed = abs(f1 - 1.0) < 1e-9
    return FixedPointReport(
        row=row,
        f_at_1=f1,
        slope_at_1=d1,
        fixed_at_1=fixed,
        attracting=fixed and abs(d1) < 1.0,
        slope_at_0=row[0],
        max_on_unit=float(np.max(evaluate(row, np.linspace(0.0, 1.0, 20001)))),
        basin_upper_edge=basin_upper_edge(row) if fixed else float("nan"),
        converges_on_unit=converges_on_unit_interval(row),
    )


def cubic_attracting_range(a_grid: np.ndarray) -> tuple[float, float]:
    """Smallest and largest ``a`` on ``a_grid`` whose cubic has 1 as an attracting fixed point, checked
    by iterating (points started at 1 +- 0.01 must converge), not by the formula."""
    good = []
    for a in a_grid:
        row = cubic_family(a)
        end = compose([row] * ITERS, np.array([0.99, 1.01]))
        if np.all(np.isfinite(end)) and np.max(np.abs(end - 1.0)) < 1e-3:
            good.append(a)
    if not good:
        raise ValueError("no a on the grid gives an attracting fixed point at 1")
    return float(min(good)), float(max(good))


def largest_convergent_a(
    family: Callable[[float], Sequence[float]] = quintic_line,
    a_lo: float = 3.0,
    a_hi: float = 4.0,
    tol: float = 1e-4,
) -> dict[str, float]:
    """Bisect for the largest ``a`` such that repeating ``family(a)`` converges on all of (0, 1].

    Returns ``a`` and, just above it, the reason: the peak of ``f`` on (0, 1] against the right edge
    of the basin of 1 (divergence starts when the peak passes the edge).
    """
    if not converges_on_unit_interval(family(a_lo)):
        raise ValueError(f"family({a_lo}) already fails to converge; lower a_lo")
    if converges_on_unit_interval(family(a_hi)):
        raise ValueError(f"family({a_hi}) still converges; raise a_hi")
    lo, hi = a_lo, a_hi
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if converges_on_unit_interval(family(mid)) else (lo, mid)
    below, above = analyse(family(lo)), analyse(family(hi))
    return {
        "a": lo,
        "peak_below": below.max_on_unit,
        "edge_below": below.basin_upper_edge,
        "peak_above": above.max_on_unit,
        "edge_above": above.basin_upper_edge,
    }
