"""The experiments on synthetic problems, run with Kim & Oh's algorithm itself (``X_0 = M / max(1, ||M||_F)``, then
the SVD polar factor or q NS steps of ``p_kappa`` without renormalising):

* ``rank``: matrix regression whose gradient rank r is set by the input's rank; the mean nuclear norm of the
  gradient for SGD-M, SVD-Muon and NS-Muon vs r, with log-log slopes.
* ``bound``: a quadratic with known L, D, sigma: the measured mean nuclear-norm gradient against Theorem 1's
  bound (NS-Muon with its measured epsilon, and SVD-Muon).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .. import coefficients as C
from ..newton_schulz import newton_schulz_plain, orthogonalize
from ._plots import pyplot as _pyplot
from .bounds import muon_bound, muon_hyperparameters, sgd_momentum_rate

__all__ = ["bound", "rank"]


# ----------------------------------------------------------------------------------------------- rank


def _orth_update(kind: str, M: torch.Tensor, q: int = 3, kappa: int = 2) -> torch.Tensor:
    """Kim & Oh's step direction: ``X_0 = M / max(1, ||M||_F)``, then the SVD polar factor or q NS steps."""
    X = M / max(1.0, float(torch.linalg.norm(M)))
    return orthogonalize(X, method="svd") if kind == "svd" else _ns_paper(X, q, kappa)


def _ns_paper(X: torch.Tensor, q: int, kappa: int) -> torch.Tensor:
    """q steps of ``X <- X p_kappa(X^T X)`` without renormalising (the caller scaled X already)."""
    tall = X.shape[0] > X.shape[1]
    Y = newton_schulz_plain((X.mT if tall else X).unsqueeze(0), [C.taylor_row(kappa)] * q)[0]
    return Y.mT if tall else Y


def rank(
    ranks: tuple[int, ...] = (2, 4, 8, 16, 32, 64),
    n: int = 64,
    samples: int = 512,
    batch: int = 32,
    steps: int = 200,
    seeds: tuple[int, ...] = (0, 1),
    lrs: dict[str, tuple[float, ...]] | None = None,
) -> dict[str, Any]:
    """Linear regression ``f(W) = ||(W - W*) X||_F^2 / (2N)`` with ``X`` of rank r: every gradient has rank <= r.

    Each method's lr is the best of a small grid for each r (lowest mean nuclear norm), momentum 0.9.
    """
    lrs = lrs or {
        "sgd_m": (0.01, 0.03, 0.1, 0.3, 1.0),
        "svd_muon": (0.01, 0.03, 0.1, 0.3),
        "ns_muon": (0.01, 0.03, 0.1, 0.3),
    }
    results: dict[str, list[dict[str, float]]] = {m: [] for m in lrs}
    for r in ranks:
        for method, grid in lrs.items():
            best = None
            for lr in grid:
                vals = [_regression_run(method, r, n, samples, batch, steps, lr, seed) for seed in seeds]
                mean = float(np.mean(vals))
                if best is None or mean < best["mean_nuclear_grad"]:
                    best = {"r": r, "lr": lr, "mean_nuclear_grad": mean}
            results[method].append(best)  # type: ignore[arg-type]
    slopes = {}
    for method, pts in results.items():
        x = np.log([p["r"] for p in pts])
        y = np.log([p["mean_nuclear_grad"] for p in pts])
        slopes[method] = float(np.polyfit(x, y, 1)[0])
    return {"ranks": list(ranks), "n": n, "steps": steps, "results": results, "slopes": slopes}


def _regression_run(method: str, r: int, n: int, samples: int, batch: int, steps: int, lr: float, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    # input directions with decaying scales (eigenvalues of X X^T / N about 1/i): the curvature spread grows with r
    scales = torch.arange(1, r + 1, dtype=torch.float64) ** -0.5
    X = basis @ (scales[:, None] * torch.randn(r, samples, generator=gen, dtype=torch.float64))
    W_star = torch.randn(n, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
    Y = W_star @ X + 0.1 * torch.randn(n, samples, generator=gen, dtype=torch.float64)
    W = torch.zeros(n, n, dtype=torch.float64)
    M = torch.zeros_like(W)
    total = 0.0
    for _ in range(steps):
        full = (W @ X - Y) @ X.T / samples
        total += float(torch.linalg.svdvals(full).sum())
        idx = torch.randint(0, samples, (batch,), generator=gen)
        g = (W @ X[:, idx] - Y[:, idx]) @ X[:, idx].T / batch
        M = 0.9 * M + g
        step = M if method == "sgd_m" else _orth_update("svd" if method == "svd_muon" else "ns", M)
        W = W - lr * step
    return total / steps


def _plot_rank(res: dict[str, Any], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    for method, pts in res["results"].items():
        ax.plot(
            [p["r"] for p in pts],
            [p["mean_nuclear_grad"] for p in pts],
            marker="o",
            label=f"{method} (slope {res['slopes'][method]:.2f})",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("gradient rank r")
    ax.set_ylabel("mean nuclear norm of the gradient")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _table_rank(res: dict[str, Any]) -> str:
    lines = [f"{'method':<10} " + " ".join(f"{'r=' + str(r):>9}" for r in res["ranks"]) + f" {'slope':>7}"]
    for method, pts in res["results"].items():
        lines.append(
            f"{method:<10} "
            + " ".join(f"{p['mean_nuclear_grad']:>9.4g}" for p in pts)
            + f" {res['slopes'][method]:>7.3f}"
        )
    return "mean ||grad f||_* over the run (best lr per r)\n" + "\n".join(lines)


# ----------------------------------------------------------------------------------------------- bound


def bound(
    m: int = 8,
    n: int = 32,
    T: int = 400,
    sigma: float = 1.0,
    c: float = 1.0,
    q: int = 5,
    kappa: int = 2,
    seeds: tuple[int, ...] = (0, 1, 2),
) -> dict[str, Any]:
    """``f(W) = c/2 ||W - W*||_F^2`` on ``m x n``: ``L = c r`` with ``r = min(m, n)`` (``||.||_* <= r ||.||_op``),
    ``D = f(W_0)``, gradient noise with ``E ||xi||_F^2 = sigma^2`` (B = 1). Runs Kim & Oh's algorithm with
    Theorem 1's eta and beta; NS-Muon's bound uses the largest polar error measured during the run. A wide
    matrix keeps the momentum's singular values away from 0 (Gaussian noise of aspect 4 is well conditioned),
    so that epsilon stays below 1 and the bound is not vacuous."""
    r = min(m, n)
    L = c * r
    out: dict[str, Any] = {"m": m, "n": n, "T": T, "sigma": sigma, "L": L, "q": q, "kappa": kappa, "runs": {}}
    for method in ("svd_muon", "ns_muon", "sgd_m"):
        means, eps_max, D_vals = [], 0.0, []
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed)
            W_star = torch.randn(m, n, generator=gen, dtype=torch.float64)
            W = torch.zeros(m, n, dtype=torch.float64)
            D = 0.5 * c * float(torch.linalg.norm(W - W_star) ** 2)
            D_vals.append(D)
            eta, beta = muon_hyperparameters(L, D, sigma, 1, r, T)
            M = torch.zeros_like(W)
            total = 0.0
            for _ in range(T):
                grad = c * (W - W_star)
                total += float(torch.linalg.svdvals(grad).sum())
                g = grad + sigma / math.sqrt(m * n) * torch.randn(m, n, generator=gen, dtype=torch.float64)
                M = beta * M + g
                if method == "sgd_m":
                    # Theorem 3's step sizes are not given in closed form here: (1 - beta) / c makes the
                    # momentum average a Newton step on this quadratic. Compared for shape only.
                    W = W - (1 - beta) / c * M
                    continue
                U = _orth_update("svd" if method == "svd_muon" else "ns", M, q, kappa)
                if method == "ns_muon":
                    exact = _orth_update("svd", M)
                    eps_max = max(eps_max, float(torch.linalg.matrix_norm(U - exact, ord=2)))
                W = W - eta * U
            means.append(total / T)
        D = float(np.mean(D_vals))
        entry: dict[str, Any] = {"measured": float(np.mean(means)), "D": D}
        if method == "sgd_m":
            entry["rate_unit_constants"] = sgd_momentum_rate(L, D, sigma, 1, r, T)["total"]
        else:
            eps = eps_max if method == "ns_muon" else 0.0
            entry.update({"eps_measured_max": eps, "bound": muon_bound(L, D, sigma, 1, r, T, eps).to_dict()})
        out["runs"][method] = entry
    return out


def _table_bound(res: dict[str, Any]) -> str:
    lines = [f"quadratic {res['m']}x{res['n']}, L = {res['L']}, sigma = {res['sigma']}, T = {res['T']}, q = {res['q']}"]
    for method, e in res["runs"].items():
        if "bound" in e:
            b = e["bound"]["total"]
            lines.append(
                f"{method:<9} measured {e['measured']:.4g}  Theorem 1 bound {b:.4g} "
                f"(eps = {e['eps_measured_max']:.3g})  holds: {e['measured'] <= b}"
            )
        else:
            lines.append(
                f"{method:<9} measured {e['measured']:.4g}  Theorem 3 rate with unit constants "
                f"{e['rate_unit_constants']:.4g} (shape only)"
            )
    return "\n".join(lines)


def _plot_bound(res: dict[str, Any], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
    names = list(res["runs"])
    measured = [res["runs"][m]["measured"] for m in names]
    bounds = [
        res["runs"][m]["bound"]["total"] if "bound" in res["runs"][m] else res["runs"][m]["rate_unit_constants"]
        for m in names
    ]
    x = np.arange(len(names))
    ax.bar(x - 0.2, measured, 0.4, label="measured mean ||grad||_*")
    ax.bar(x + 0.2, bounds, 0.4, label="Theorem 1 bound (SGD-M: Thm 3, unit constants)")
    ax.set_xticks(x, names)
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
