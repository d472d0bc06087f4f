"""``muonkit theory``: Kim & Oh's convergence quantities for your schedule, and the experiments that check them."""

from __future__ import annotations

import argparse
from typing import Any

from ._args import number

__all__ = ["add_parser"]

QUICK: dict[str, dict[str, Any]] = {
    "constant": {"ls": (0.1, 0.5), "kappas": (1, 2, 3), "qs": (1, 2, 3, 4)},
    "rate": {"steps": 60, "seeds": (0,)},
    "rank": {"ranks": (2, 8, 32), "steps": 100, "seeds": (0,)},
    "degree": {"steps": 60, "seeds": (0,), "kappas": (1, 2, 3)},
    "bound": {"T": 150, "seeds": (0,)},
    "achieved": {"presets": ("jordan", "taylor_5"), "steps": 30, "every": 10},
}


def _constant(args: argparse.Namespace) -> int:
    from ..theory import residual_iterates, taylor_epsilon

    t = taylor_epsilon(args.kappa, args.q, args.l)
    deltas = residual_iterates(args.kappa, args.q, args.l)
    print(f"p_kappa with kappa = {args.kappa} (degree {2 * args.kappa + 1}), q = {args.q}, l = {args.l:g}")
    print("  delta_j (exact): " + ", ".join(f"{d:.4g}" for d in deltas))
    print(f"  delta_q <= delta_0^((kappa+1)^q) = {(1 - args.l**2) ** ((args.kappa + 1) ** args.q):.4g}")
    print(f"  epsilon_q = {t['epsilon']:.4g} (bound {t['epsilon_bound']:.4g})")
    print(
        f"  chi_q = 1/(1 - eps) = {t['chi']:.6g} (bound {t['chi_bound']:.6g}); "
        f"(1+eps)^2/(1-eps) = {t['chi_strict']:.6g}"
    )
    return 0


def _epsilon(args: argparse.Namespace) -> int:
    from .. import coefficients as C
    from ..theory import schedule_epsilon

    p = C.as_preset(args.name)
    rows = p.schedule(args.steps)
    s = schedule_epsilon(rows, args.l / p.norm_scale)
    print(f"{p.name}, {len(rows)} steps, singular values in [{args.l:g}, 1]:")
    print(
        f"  epsilon = max |1 - phi(sigma)| = {s['epsilon']:.4g}; chi = {s['chi']:.6g}; "
        f"(1+eps)^2/(1-eps) = {s['chi_strict']:.6g}"
    )
    if not s["converges_to_1"]:
        print("  repeating its last row does not drive singular values to 1: chi stays above 1 however many steps")
    return 0


def _bound(args: argparse.Namespace) -> int:
    from ..theory import muon_bound, rank_gap, sgd_momentum_rate

    b = muon_bound(args.L, args.D, args.sigma, args.B, args.r, args.T, args.eps)
    svd = muon_bound(args.L, args.D, args.sigma, args.B, args.r, args.T, 0.0)
    sgd = sgd_momentum_rate(args.L, args.D, args.sigma, args.B, args.r, args.T)
    gap = rank_gap(args.L, args.D, args.sigma, args.B, args.r, args.T)
    print(f"Theorem 1 (eta = {b.eta:.4g}, beta = {b.beta:.4g}):")
    print(
        f"  NS-Muon (eps = {args.eps:g}): {b.total:.6g}  = {b.deterministic:.4g} + {b.noise_quartic:.4g} "
        f"+ {b.noise_linear:.4g}"
    )
    print(f"  SVD-Muon (eps = 0):   {svd.total:.6g}")
    print(f"Theorem 3 (SGD-M, unit constants): {sgd['total']:.6g}")
    print(
        f"SGD-M / Muon, unit constants: deterministic x{gap['deterministic_ratio']:.4g} (sqrt(r)), "
        f"noise x{gap['noise_ratio']:.4g} (r^(1/4))"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    from ..theory.experiments import run

    kwargs = dict(QUICK[args.experiment]) if args.quick else {}
    if args.task and args.experiment in ("rate", "degree"):
        kwargs["task"] = args.task
    _, table, files = run(args.experiment, args.out, **kwargs)
    print(table)
    for f in files:
        print(f"wrote {f}")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("theory", help="Kim & Oh's convergence theory: constants, bounds, experiments")
    ts = p.add_subparsers(dest="theory_command", required=True)
    c = ts.add_parser("constant", help="epsilon_q and chi_q for the paper's p_kappa")
    c.add_argument("--kappa", type=number(1, 50, integer=True), default=2)
    c.add_argument("--q", type=number(0, 64, integer=True), default=3)
    c.add_argument("--l", type=number(0, 1, open_low=True), default=0.1, help="smallest normalised singular value")
    c.set_defaults(func=_constant)
    e = ts.add_parser("epsilon", help="epsilon and chi measured for any schedule (preset, .json)")
    e.add_argument("name")
    e.add_argument("--steps", type=number(1, 1000, integer=True), default=None)
    e.add_argument("--l", type=number(0, 1, open_low=True), default=0.1)
    e.set_defaults(func=_epsilon)
    b = ts.add_parser("bound", help="Theorem 1 and Theorem 3 for given problem constants")
    b.add_argument("--L", type=number(0, open_low=True), default=1.0)
    for name, default in (("--D", 1.0), ("--sigma", 1.0), ("--eps", 0.0)):
        b.add_argument(name, type=number(0), default=default)
    for name, default in (("--B", 1), ("--r", 64), ("--T", 1000)):
        b.add_argument(name, type=number(1, integer=True), default=default)
    b.set_defaults(func=_bound)
    r = ts.add_parser("run", help="run an experiment: constant, rate, rank, degree, bound, achieved")
    r.add_argument("experiment", choices=list(QUICK))
    r.add_argument("--out", default="runs/theory")
    r.add_argument("--quick", action="store_true", help="a small version that runs in seconds")
    r.add_argument("--task", choices=["digits", "lm"], default=None, help="rate/degree: training task")
    r.set_defaults(func=_run)
