"""How good a schedule is: its band, where it starts working, its cost, and its error on matrices."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .polynomials import as_rows, compose, log_grid, schedule_cost

__all__ = ["apply_schedule_np", "band", "newton_schulz_np", "orthogonality_error", "smallest_x_in_band", "summary"]


def band(rows: Sequence[Sequence[float]], x_lo: float = 1e-3, x_hi: float = 1.0, n: int = 4001) -> tuple[float, float]:
    """``[min phi, max phi]`` over ``x`` in ``[x_lo, x_hi]`` (log grid plus the end points)."""
    phi = compose(as_rows(rows), log_grid(x_lo, x_hi, n))
    return float(np.min(phi)), float(np.max(phi))


def smallest_x_in_band(rows: Sequence[Sequence[float]], eps: float = 0.3, x_min: float = 1e-9, n: int = 8001) -> float:
    """Smallest ``x`` such that every ``x'`` in ``[x, 1]`` ends in ``[1 - eps, 1 + eps]``.

    ``inf`` if even ``x = 1`` does not.
    """
    xs = log_grid(x_min, 1.0, n)
    phi = compose(as_rows(rows), xs)
    inside = np.isfinite(phi) & (np.abs(phi - 1.0) <= eps)
    if not inside[-1]:
        return float("inf")
    bad = np.nonzero(~inside)[0]
    return float(xs[bad[-1] + 1] if bad.size else xs[0])


def newton_schulz_np(G: np.ndarray, rows: Sequence[Sequence[float]], norm_scale: float = 1.0) -> np.ndarray:
    """Newton-Schulz on one matrix in float64 NumPy (Frobenius-normalised, smaller Gram side)."""
    X = np.asarray(G, dtype=np.float64)
    return apply_schedule_np(X / (norm_scale * np.linalg.norm(X) + 1e-300), rows)


def apply_schedule_np(X: np.ndarray, rows: Sequence[Sequence[float]]) -> np.ndarray:
    """The schedule's polynomials applied to the singular values of ``X`` as it is (no normalisation)."""
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    for row in as_rows(rows):
        A = X @ X.T
        B = row[-1] * A
        for coef in reversed(row[1:-1]):
            B = coef * A + A @ B
        X = row[0] * X + B @ X
    return X.T if tall else X


def orthogonality_error(
    rows: Sequence[Sequence[float]],
    sigmas: Sequence[float],
    m: int = 64,
    n: int = 128,
    trials: int = 3,
    seed: int = 0,
    normalise: bool = False,
) -> dict[str, float]:
    """NS on random ``m x n`` matrices with singular values ``sigmas`` (``len == min(m, n)``).

    With ``normalise=False`` the singular values are used as they are (they must lie in (0, 1]), so the
    result can be compared with the scalar map; with ``True`` the input is Frobenius-normalised first,
    as ``orthogonalize`` does. Returns the worst ``max |sigma_i(X) - 1|``, ``||X X^T - I||_op`` and the
    distance to the exact polar factor ``||X - U V^T||_op`` over the trials.
    """
    rng = np.random.default_rng(seed)
    s = np.asarray(sigmas, dtype=np.float64)
    k = min(m, n)
    if s.size != k:
        raise ValueError(f"need {k} singular values for a {m} x {n} matrix, got {s.size}")
    worst = {"max_abs_sigma_minus_1": 0.0, "gram_error_op": 0.0, "polar_error_op": 0.0}
    for _ in range(trials):
        U, _ = np.linalg.qr(rng.standard_normal((m, k)))
        V, _ = np.linalg.qr(rng.standard_normal((n, k)))
        G = (U * s) @ V.T
        X = newton_schulz_np(G, rows) if normalise else apply_schedule_np(G, rows)
        sv = np.linalg.svd(X, compute_uv=False)
        gram = X @ X.T if m <= n else X.T @ X
        worst["max_abs_sigma_minus_1"] = max(worst["max_abs_sigma_minus_1"], float(np.max(np.abs(sv - 1))))
        worst["gram_error_op"] = max(worst["gram_error_op"], float(np.linalg.norm(gram - np.eye(k), 2)))
        worst["polar_error_op"] = max(worst["polar_error_op"], float(np.linalg.norm(X - U @ V.T, 2)))
    return worst


def summary(rows: Sequence[Sequence[float]], x_lo: float = 1e-3, eps: float = 0.3) -> dict[str, float]:
    """Band on ``[x_lo, 1]``, smallest x reaching ``1 +- eps``, and cost, in one dict."""
    lo, hi = band(rows, x_lo)
    return {
        "x_lo": x_lo,
        "band_lo": lo,
        "band_hi": hi,
        "eps": eps,
        "smallest_x_in_band": smallest_x_in_band(rows, eps),
        **schedule_cost(rows),
    }
