"""Odd polynomials and their compositions, in float64 NumPy (no torch).

A Newton-Schulz step acts on each singular value ``x`` by ``f(x) = a x + b x^3 + c x^5 + ...``;
``k`` steps act by the composition ``phi = f_k o ... o f_1``. A *row* is ``(a, b, c, ...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..coefficients import taylor_row  # pure Python: re-exported here for the NumPy lab

__all__ = [
    "as_rows",
    "compose",
    "derivative",
    "evaluate",
    "log_grid",
    "matmuls_per_step",
    "schedule_cost",
    "taylor_row",
]

Row = tuple[float, ...]


def as_rows(rows: Sequence[Sequence[float]] | Sequence[float]) -> list[Row]:
    """Rows as a list of float tuples; one row ``(a, b, ...)`` is accepted as a one-step schedule."""
    items: list[Any] = list(rows)
    if not items:
        raise ValueError("an empty schedule was given")
    if all(isinstance(v, (int, float, np.floating)) for v in items):
        items = [items]
    out = [tuple(float(v) for v in r) for r in items]
    if any(len(r) < 2 for r in out):
        raise ValueError("each row needs at least (a, b): degree 3 or higher")
    return out


def evaluate(row: Sequence[float], x: np.ndarray | float) -> np.ndarray:
    """``f(x) = sum_i row[i] x^(2i+1)`` by Horner in ``x^2``."""
    x = np.asarray(x, dtype=np.float64)
    x2 = x * x
    acc = np.zeros_like(x)
    for coef in reversed(row):
        acc = acc * x2 + coef
    return x * acc


def derivative(row: Sequence[float], x: np.ndarray | float) -> np.ndarray:
    """``f'(x) = sum_i (2i+1) row[i] x^(2i)``."""
    x = np.asarray(x, dtype=np.float64)
    x2 = x * x
    acc = np.zeros_like(x)
    for i in reversed(range(len(row))):
        acc = acc * x2 + (2 * i + 1) * row[i]
    return acc


def compose(rows: Sequence[Sequence[float]], x: np.ndarray | float, *, keep_steps: bool = False) -> np.ndarray:
    """``phi(x)`` for the schedule ``rows``; with ``keep_steps`` an array (steps + 1, *x.shape) of all iterates.

    Iterates that overflow become ``inf`` (NumPy warnings silenced): a diverging schedule shows as such.
    """
    x = np.asarray(x, dtype=np.float64)
    steps = [x]
    with np.errstate(over="ignore", invalid="ignore"):
        for row in rows:
            x = evaluate(row, x)
            steps.append(x)
    return np.stack(steps) if keep_steps else x


def log_grid(x_lo: float = 1e-6, x_hi: float = 1.0, n: int = 4001) -> np.ndarray:
    """Log-spaced points in ``[x_lo, x_hi]`` (singular values span orders of magnitude)."""
    if not 0 < x_lo < x_hi:
        raise ValueError(f"need 0 < x_lo < x_hi, got {x_lo}, {x_hi}")
    return np.geomspace(x_lo, x_hi, n)


def matmuls_per_step(degree: int) -> int:
    """Matrix products per NS step of odd ``degree``: ``A = X X^T``, ``degree // 2 - 1`` powers of A, ``B X``."""
    if degree < 3 or degree % 2 == 0:
        raise ValueError(f"degree must be odd and >= 3, got {degree}")
    return 1 + (degree // 2 - 1) + 1


def schedule_cost(rows: Sequence[Sequence[float]], m: int | None = None, n: int | None = None) -> dict[str, float]:
    """Cost of a schedule: matrix products, and FLOPs for an ``m x n`` input (``m <= n``) if given.

    Per step: ``X X^T`` costs ``2 m^2 n``; each power of ``A`` ``2 m^3``; ``B X`` ``2 m^2 n``.
    """
    rows = as_rows(rows)
    products = sum(matmuls_per_step(2 * len(r) - 1) for r in rows)
    out: dict[str, float] = {"steps": len(rows), "matmuls": products}
    if m is not None and n is not None:
        m, n = min(m, n), max(m, n)
        out["flops"] = float(sum(4 * m * m * n + (len(r) - 2) * 2 * m**3 for r in rows))
    return out
