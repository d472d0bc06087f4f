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

* ``achieved``: epsilon and chi as achieved by each preset's NS output while the demo's tiny GPT trains, beside
  the scalar map's epsilon for singular values in ``[l, 1]``.

``rank`` and ``bound`` live in ``synthetic``; the others here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .. import coefficients as C
from ._plots import pyplot as _pyplot
from .constants import schedule_epsilon, taylor_epsilon
from .synthetic import _plot_bound, _plot_rank, _table_bound, _table_rank, bound, rank

__all__ = ["EXPERIMENTS", "achieved", "bound", "constant", "degree", "rank", "rate"]


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
                [t["q"] for t in pts], [max(t["chi_excess"], 1e-300) for t in pts], marker=".", label=f"kappa={k}"
            )
            ax.plot(
                [t["q"] for t in pts],
                [max(t["chi_excess_bound"], 1e-300) for t in pts],
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


def _chi_text(t: dict[str, Any]) -> str:
    """chi, or ``1+x`` with ``x = chi - 1`` where chi itself would print as 1."""
    x = t.get("chi_excess", t["chi"] - 1)
    return f"{t['chi']:.4g}" if x >= 1e-3 else f"1+{x:.1e}"


def _table_constant(res: dict[str, Any]) -> str:
    lines = [f"{'l':>5} {'schedule':<14} " + " ".join(f"{'q=' + str(q):>10}" for q in res["qs"])]
    for l in res["ls"]:
        for k in res["kappas"]:
            vals = [_chi_text(t) for t in res["taylor"] if t["l"] == l and t["kappa"] == k]
            lines.append(f"{l:>5} {'kappa=' + str(k):<14} " + " ".join(f"{v:>10}" for v in vals))
        for name in ("jordan", "polar_express"):
            vals = [_chi_text(t) for t in res["presets"] if t["l"] == l and t["name"] == name]
            lines.append(f"{l:>5} {name:<14} " + " ".join(f"{v:>10}" for v in vals))
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
    from ..train.loop import warm_up

    def make_task(seed: int) -> Any:
        if task_name == "digits":
            return DigitsTask(seed=seed)
        return LMTask(builtin_corpus(), SIZES["tiny"], seed=seed, size="tiny")

    warm_up(make_task(seeds[0]), seeds[0])  # one-off process costs on no variant's clock (train_one counts builds)
    out: dict[str, Any] = {}
    for name, factory in variants.items():
        runs = []
        for seed in seeds:
            task = make_task(seed)
            r = train_one(
                task, "muon", steps=steps, eval_every=max(1, steps // 20), seed=seed, optimizer_factory=factory
            )
            runs.append(r.to_dict())
        out[name] = runs
    return out


def _lrs(task_name: str) -> dict[str, float]:
    from ..train.optimizers import resolve_lrs

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


# ----------------------------------------------------------------------------------------------- achieved


def achieved(
    presets: tuple[str, ...] = ("jordan", "polar_express", "taylor_5", "taylor_7"),
    steps: int = 300,
    every: int = 10,
    seed: int = 0,
    cuts: tuple[float, ...] = (1e-3, 1e-2, 1e-1),
) -> dict[str, Any]:
    """The polar error epsilon *as achieved* while the demo's tiny GPT trains with each preset, beside what the
    scalar map promises, on the part of the spectrum that a bound with ``l = cut`` covers.

    Every ``every`` steps, for each Muon matrix (QKV split in three): the update ``M`` that was orthogonalized
    (the Nesterov blend of gradient and momentum), its SVD ``U S V^T`` in float64, the normalised singular values
    ``x = S / (norm_scale ||M||_F)`` (NS's input), and the NS output ``O`` in the precision training uses (float32
    on the CPU); ``u_i^T O v_i`` is what NS made of ``x_i``. Per cut: ``epsilon`` = the largest ``|u_i^T O v_i - 1|``
    over ``x_i >= cut`` (over all matrices), and ``predicted`` = ``schedule_epsilon(rows, cut)``. Also recorded:
    the fraction of singular values below each cut (LayerNorm'ed inputs give every gradient a null direction;
    real spectra spread over many decades, so no single l covers them)."""
    from ..newton_schulz import orthogonalize
    from ..optim import Muon, param_groups
    from ..train import SIZES, LMTask, builtin_corpus, train_one
    from ..train.loop import orthogonalized_matrices
    from ..train.optimizers import resolve_lrs

    lrs = resolve_lrs("lm-small")
    out: dict[str, Any] = {"steps": steps, "every": every, "seed": seed, "cuts": list(cuts), "presets": {}}
    for name in presets:
        preset = C.get(name)
        predicted = {str(c): schedule_epsilon(preset.schedule(None), c / preset.norm_scale)["epsilon"] for c in cuts}
        state: dict[str, Any] = {"opt": None, "calls": 0, "trace": []}

        def make(model: torch.nn.Module, name: str = name, state: dict = state) -> torch.optim.Optimizer:
            groups = param_groups(model, split={"*.qkv.weight": 3})
            state["opt"] = Muon(groups, lr=lrs["muon"], adamw_lr=lrs["adamw"], coefficients=name)
            return state["opt"]

        def on_step(result: Any, name: str = name, state: dict = state, norm_scale: float = preset.norm_scale) -> None:
            count, opt = state["calls"], state["opt"]
            state["calls"] += 1
            if count % every:
                return
            eps = dict.fromkeys(map(str, cuts), 0.0)
            below = dict.fromkeys(map(str, cuts), 0)
            total = 0
            for M in orthogonalized_matrices(opt, torch.float64):
                U, S, Vh = torch.linalg.svd(M, full_matrices=False)
                x = S / (norm_scale * float(torch.linalg.norm(M)))
                O = orthogonalize(M.float(), name).double()
                made = (U.mT @ O @ Vh.mT).diagonal()
                total += x.numel()
                for c in cuts:
                    keep = x >= c
                    below[str(c)] += int((~keep).sum())
                    if keep.any():
                        eps[str(c)] = max(eps[str(c)], float((made[keep] - 1).abs().max()))
            state["trace"].append(
                {"step": count, "epsilon": eps, "fraction_below": {k: v / total for k, v in below.items()}}
            )

        task = LMTask(builtin_corpus(), SIZES["tiny"], seed=seed, size="tiny")
        train_one(task, "muon", steps=steps, eval_every=steps, seed=seed, optimizer_factory=make, on_step=on_step)
        trace = state["trace"]
        out["presets"][name] = {
            "ns_steps": len(preset.schedule(None)),
            "trace": trace,
            "predicted": predicted,
            "epsilon_max": {str(c): max(t["epsilon"][str(c)] for t in trace) for c in cuts},
            "fraction_below_median": {
                str(c): float(np.median([t["fraction_below"][str(c)] for t in trace])) for c in cuts
            },
        }
    return out


def _table_achieved(res: dict[str, Any]) -> str:
    cuts = [str(c) for c in res["cuts"]]
    head = f"{'preset':<14}" + "".join(f" {'l >= ' + c + ': eps / map':>22} {'below':>6}" for c in cuts)
    lines = [head]
    for name, e in res["presets"].items():
        cells = "".join(
            f" {e['epsilon_max'][c]:>10.3g} / {e['predicted'][c]:<9.3g} {e['fraction_below_median'][c]:>6.1%}"
            for c in cuts
        )
        lines.append(f"{name:<14}{cells}")
    return (
        f"largest achieved epsilon over the singular directions with normalised value >= l (tiny GPT, {res['steps']} "
        "steps), against the scalar map's epsilon on [l, 1]; 'below': median share of singular values under l\n"
        + "\n".join(lines)
    )


def _plot_achieved(res: dict[str, Any], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=110)
    cut = str(res["cuts"][len(res["cuts"]) // 2])
    for name, e in res["presets"].items():
        ax.plot([t["step"] for t in e["trace"]], [max(t["epsilon"][cut], 1e-17) for t in e["trace"]], label=name)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"achieved epsilon, directions with x >= {cut}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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


# ----------------------------------------------------------------------------------------------- plumbing


EXPERIMENTS: dict[str, tuple[Callable[..., dict[str, Any]], Callable, Callable]] = {
    "constant": (constant, _table_constant, _plot_constant),
    "rate": (rate, _table_training, _plot_training),
    "rank": (rank, _table_rank, _plot_rank),
    "degree": (degree, _table_training, _plot_training),
    "bound": (bound, _table_bound, _plot_bound),
    "achieved": (achieved, _table_achieved, _plot_achieved),
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
