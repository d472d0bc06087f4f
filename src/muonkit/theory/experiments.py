"""Experiments that check Kim & Oh's claims (``muonkit theory run NAME``). Each returns a JSON-able dict,
and ``run`` writes it with a PNG and prints a table.

* ``constant``: chi_q vs q for kappa = 1..5 at several l (exact and Theorem 2 bound), plus jordan and
  polar_express: the doubly exponential approach to 1, and which schedules do not approach it at all.
* ``rate``: SGD-M, SVD-Muon and NS-Muon (q = 1, 2, 3, kappa = 2) on a real task, several seeds.
* ``rank``: matrix regression whose gradient rank r is set by the input's rank; the mean nuclear norm of
  the gradient for SGD-M, SVD-Muon and NS-Muon vs r, with log-log slopes.
* ``degree``: kappa = 1..5 at q = 3 on a real task: loss and time per step.
* ``bound``: a quadratic with known L, D, sigma: the measured mean nuclear-norm gradient against
  Theorem 1's bound (NS-Muon with its measured epsilon, and SVD-Muon).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .. import coefficients as C
from ..newton_schulz import newton_schulz_plain, orthogonalize
from .bounds import muon_bound, muon_hyperparameters, sgd_momentum_rate
from .constants import schedule_epsilon, taylor_epsilon

__all__ = ["EXPERIMENTS", "bound", "constant", "degree", "rank", "rate"]


# ----------------------------------------------------------------------------------------------- constant


def constant(
    ls: tuple[float, ...] = (0.01, 0.1, 0.5),
    kappas: tuple[int, ...] = (1, 2, 3, 4, 5),
    qs: tuple[int, ...] = tuple(range(1, 9)),
) -> dict[str, Any]:
    taylor = [taylor_epsilon(k, q, l) for l in ls for k in kappas for q in qs]
    presets = []
    for name in ("jordan", "polar_express"):
        p = C.get(name)
        for l in ls:
            for q in qs:
                presets.append({"name": name, "l": l, "q": q, **schedule_epsilon(p.schedule(q), l / p.norm_scale)})
    return {"taylor": taylor, "presets": presets, "ls": list(ls), "kappas": list(kappas), "qs": list(qs)}


def _plot_constant(res: dict[str, Any], path: str) -> None:
    plt = _pyplot()
    ls = res["ls"]
    fig, axes = plt.subplots(1, len(ls), figsize=(4.2 * len(ls), 3.8), dpi=110, sharey=True)
    for ax, l in zip(np.atleast_1d(axes), ls):
        for k in res["kappas"]:
            pts = [t for t in res["taylor"] if t["l"] == l and t["kappa"] == k]
            line = ax.plot(
                [t["q"] for t in pts], [max(t["chi"] - 1, 1e-17) for t in pts], marker=".", label=f"kappa={k}"
            )
            ax.plot(
                [t["q"] for t in pts],
                [max(t["chi_bound"] - 1, 1e-17) for t in pts],
                ls="--",
                color=line[0].get_color(),
                lw=0.8,
            )
        for name, mk in (("jordan", "x"), ("polar_express", "s")):
            pts = [t for t in res["presets"] if t["l"] == l and t["name"] == name]
            ax.plot(
                [t["q"] for t in pts],
                [max(t["chi"] - 1, 1e-17) for t in pts],
                ls="none",
                marker=mk,
                color="k",
                label=name,
            )
        ax.set_yscale("log")
        ax.set_ylim(1e-16, 1e4)
        ax.set_xlabel("NS steps q")
        ax.set_title(f"l = {l}  (dashed: Theorem 2 bound)", fontsize=9)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("chi_q - 1")
    np.atleast_1d(axes)[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _table_constant(res: dict[str, Any]) -> str:
    lines = [f"{'l':>5} {'schedule':<14} " + " ".join(f"{'q=' + str(q):>9}" for q in res["qs"])]
    for l in res["ls"]:
        for k in res["kappas"]:
            vals = [t["chi"] for t in res["taylor"] if t["l"] == l and t["kappa"] == k]
            lines.append(f"{l:>5} {'kappa=' + str(k):<14} " + " ".join(f"{v:>9.4g}" for v in vals))
        for name in ("jordan", "polar_express"):
            vals = [t["chi"] for t in res["presets"] if t["l"] == l and t["name"] == name]
            lines.append(f"{l:>5} {name:<14} " + " ".join(f"{v:>9.4g}" for v in vals))
    return "chi_q = 1 / (1 - epsilon_q)\n" + "\n".join(lines)


# ----------------------------------------------------------------------------------------------- training


def _ns_muon_factory(q: int, kappa: int, lr: float, adamw_lr: float, split_qkv: bool) -> Callable:
    from ..optim import Muon, param_groups

    def make(model: torch.nn.Module) -> torch.optim.Optimizer:
        groups = param_groups(model, split={"*.qkv.weight": 3} if split_qkv else None)
        if q == 0:
            return Muon(groups, lr=lr, method="svd", adamw_lr=adamw_lr)
        return Muon(groups, lr=lr, coefficients=f"taylor_{2 * kappa + 1}", ns_steps=q, adamw_lr=adamw_lr)

    return make


def _train_variants(
    task_name: str, variants: dict[str, Callable], steps: int, seeds: tuple[int, ...]
) -> dict[str, Any]:
    from ..train import SIZES, DigitsTask, LMTask, builtin_corpus, train_one

    out: dict[str, Any] = {}
    for name, factory in variants.items():
        runs = []
        for seed in seeds:
            task = (
                DigitsTask(seed=seed)
                if task_name == "digits"
                else LMTask(builtin_corpus(), SIZES["tiny"], seed=seed, size="tiny")
            )
            r = train_one(
                task, "muon", steps=steps, eval_every=max(1, steps // 20), seed=seed, optimizer_factory=factory
            )
            runs.append(r.to_dict())
        out[name] = runs
    return out


def _lrs(task_name: str) -> dict[str, float]:
    from ..train.loop import resolve_lrs

    return resolve_lrs("digits" if task_name == "digits" else "lm-small")


def rate(task: str = "digits", steps: int = 300, seeds: tuple[int, ...] = (0, 1, 2)) -> dict[str, Any]:
    lrs = _lrs(task)
    lm = task == "lm"
    variants: dict[str, Callable] = {
        "sgd_m": lambda model: torch.optim.SGD(model.parameters(), lr=lrs["sgd"], momentum=0.9),
        "svd_muon": _ns_muon_factory(0, 2, lrs["muon"], lrs["adamw"], lm),
    }
    for q in (1, 2, 3):
        variants[f"ns_muon_q{q}"] = _ns_muon_factory(q, 2, lrs["muon"], lrs["adamw"], lm)
    return {"task": task, "steps": steps, "seeds": list(seeds), "runs": _train_variants(task, variants, steps, seeds)}


def degree(
    task: str = "digits", steps: int = 300, seeds: tuple[int, ...] = (0, 1), kappas: tuple[int, ...] = (1, 2, 3, 4, 5)
) -> dict[str, Any]:
    lrs = _lrs(task)
    variants = {f"kappa{k}_q3": _ns_muon_factory(3, k, lrs["muon"], lrs["adamw"], task == "lm") for k in kappas}
    return {"task": task, "steps": steps, "seeds": list(seeds), "runs": _train_variants(task, variants, steps, seeds)}


def _summary_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, runs in res["runs"].items():
        final = [r["metrics"]["val_loss"][-1] for r in runs]
        per_step = [1e3 * r["train_seconds"] / max(1, len(r["train_loss"])) for r in runs]
        opt_ms = [1e3 * r["optimizer_seconds"] / max(1, len(r["train_loss"])) for r in runs]
        rows.append(
            {
                "variant": name,
                "final_val_loss_mean": float(np.mean(final)),
                "final_val_loss_std": float(np.std(final)),
                "ms_per_step": float(np.mean(per_step)),
                "optimizer_ms_per_step": float(np.mean(opt_ms)),
            }
        )
    return rows


def _table_training(res: dict[str, Any]) -> str:
    lines = [f"{'variant':<14} {'final val loss':>20} {'ms/step':>8} {'opt ms/step':>11}"]
    for row in _summary_rows(res):
        loss = f"{row['final_val_loss_mean']:.4f} +- {row['final_val_loss_std']:.4f}"
        lines.append(
            f"{row['variant']:<14} {loss:>20} {row['ms_per_step']:>8.2f} {row['optimizer_ms_per_step']:>11.2f}"
        )
    return f"task {res['task']}, {res['steps']} steps, seeds {res['seeds']}\n" + "\n".join(lines)


def _plot_training(res: dict[str, Any], path: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for name, runs in res["runs"].items():
        steps = runs[0]["eval_steps"]
        mean = np.mean([r["metrics"]["val_loss"] for r in runs], axis=0)
        wall = np.mean([r["eval_wall"] for r in runs], axis=0)
        axes[0].plot(steps, mean, label=name)
        axes[1].plot(wall, mean, label=name)
    for ax, xl in zip(axes, ("step", "training wall-clock (s)")):
        ax.set_xlabel(xl)
        ax.set_ylabel(f"validation loss (mean of {len(res['seeds'])} seeds)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{res['task']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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


# ----------------------------------------------------------------------------------------------- plumbing


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


EXPERIMENTS: dict[str, tuple[Callable[..., dict[str, Any]], Callable, Callable]] = {
    "constant": (constant, _table_constant, _plot_constant),
    "rate": (rate, _table_training, _plot_training),
    "rank": (rank, _table_rank, _plot_rank),
    "degree": (degree, _table_training, _plot_training),
    "bound": (bound, _table_bound, _plot_bound),
}


def run(name: str, out_dir: str, **kwargs: Any) -> tuple[dict[str, Any], str, list[str]]:
    """Run experiment ``name``; write ``<out_dir>/<name>.json`` and ``.png``; return (result, table, files)."""
    import json
    import os

    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    fn, table, plot = EXPERIMENTS[name]
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    if name in ("rank", "bound"):
        torch.set_num_threads(1)  # tiny matrices: one thread is fastest and does not fight other processes
    try:
        res = fn(**kwargs)
    finally:
        torch.set_num_threads(threads)
    res["seconds"] = time.perf_counter() - t0
    os.makedirs(out_dir, exist_ok=True)
    files = [os.path.join(out_dir, f"{name}.json")]
    with open(files[0], "w") as f:
        json.dump(res, f, indent=2)
    try:
        plot(res, os.path.join(out_dir, f"{name}.png"))
        files.append(os.path.join(out_dir, f"{name}.png"))
    except ImportError:
        pass
    return res, table(res), files
