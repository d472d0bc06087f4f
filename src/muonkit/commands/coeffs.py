"""``muonkit coeffs``: list, show, compare, design and plot Newton-Schulz coefficient schedules."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from .. import coefficients as C
from .. import design as D
from ._args import number

__all__ = ["add_parser"]


class CoeffsError(ValueError):
    """Bad input to ``muonkit coeffs``: printed as one line, exit status 2."""


def _preset(name: str) -> C.Preset:
    return C.as_preset(name)


def _facts(p: C.Preset, steps: int | None, x_lo: float, eps: float) -> dict[str, Any]:
    rows = p.schedule(steps)
    lo, hi = D.band(rows, x_lo)
    return {
        "steps": len(rows),
        "matmuls": D.schedule_cost(rows)["matmuls"],
        "band_lo": lo,
        "band_hi": hi,
        "x_in_band": D.smallest_x_in_band(rows, eps),
        "phi_slope_0": math.prod(r[0] for r in rows),
    }


def _list(args: argparse.Namespace) -> int:
    print(f"{'name':<22} {'degree':>6} {'rows':>4} {'steps':>5}  design")
    for name in C.list_presets():
        p = C.get(name)
        print(f"{name:<22} {p.degree:>6} {len(p.rows):>4} {p.default_steps:>5}  {p.design.split(':')[0]}")
    return 0


def _show(args: argparse.Namespace) -> int:
    p = _preset(args.name)
    print(f"{p.name}: degree {p.degree}, {len(p.rows)} row(s), {p.default_steps} steps by default")
    print(f"  source: {p.source}\n  design: {p.design}")
    if p.norm_scale != 1.0:
        print(f"  input normalised by {p.norm_scale} * ||G||_F")
    if p.notes:
        print(f"  notes:  {p.notes}")
    print("  rows:")
    for i, r in enumerate(p.rows):
        print(f"    {i + 1}: ({', '.join(f'{v:.10g}' for v in r)})")
    if not p.per_step:
        fp = D.analyse(p.rows[0])
        print(
            f"  fixed point: f(1) = {fp.f_at_1:.6g}, f'(1) = {fp.slope_at_1:.6g}, "
            f"1 is {'an attracting' if fp.attracting else 'not an attracting'} fixed point"
            + (f"; basin reaches x = {fp.basin_upper_edge:.4g}" if fp.attracting else "")
            + f"; every x in [1e-6, 1] converges to 1 when repeated: {'yes' if fp.converges_on_unit else 'no'}"
        )
    f = _facts(p, args.steps, args.x_lo, args.eps)
    print(
        f"  {f['steps']} steps, {f['matmuls']} matrix products; phi'(0) = {f['phi_slope_0']:.4g}; "
        f"band on [{args.x_lo:g}, 1]: [{f['band_lo']:.4f}, {f['band_hi']:.4f}]; "
        + (
            f"every x >= {f['x_in_band']:.3g} lands in 1 +- {args.eps:g}"
            if math.isfinite(f["x_in_band"])
            else f"phi(1) = {D.compose(p.schedule(args.steps), 1.0):.4f} is outside 1 +- {args.eps:g}"
        )
    )
    return 0


def _compare(args: argparse.Namespace) -> int:
    names = args.names or C.list_presets()
    header = (
        f"{'name':<22} {'deg':>3} {'steps':>5} {'matmuls':>7} {'band lo':>8} {'band hi':>8} "
        f"{'x in band':>10} {'phi(0)':>10}"
    )
    print(f"band on [{args.x_lo:g}, 1]; 'x in band': smallest x from which every x lands in 1 +- {args.eps:g}")
    print(header + "\n" + "-" * len(header))
    for name in names:
        p = _preset(name)
        f = _facts(p, args.steps, args.x_lo, args.eps)
        print(
            f"{p.name:<22} {p.degree:>3} {f['steps']:>5} {f['matmuls']:>7} {f['band_lo']:>8.4f} {f['band_hi']:>8.4f} "
            f"{f['x_in_band']:>10.3g} {f['phi_slope_0']:>10.4g}"
        )
    return 0


def _design(args: argparse.Namespace) -> int:
    if args.degree < 3 or args.degree % 2 == 0:
        raise CoeffsError(f"--degree must be odd and >= 3, got {args.degree}")
    if args.method == "fixed-point":
        if args.degree not in (3, 5):
            raise CoeffsError("fixed-point design covers the cubic family (degree 3) and Jordan's quintic line (5)")
        a = args.a if args.a is not None else (1.99 if args.degree == 3 else 3.25)
        row = D.cubic_family(a) if args.degree == 3 else D.quintic_line(a)
        rep = D.analyse(row)
        if not rep.attracting:
            raise CoeffsError(f"a = {a}: 1 is not an attracting fixed point (f'(1) = {rep.slope_at_1:.3f})")
        rows: list[tuple[float, ...]] = [tuple(row)]
        design = f"fixed-point: degree {args.degree}, a = {a}"
        steps = args.steps or 5
    elif args.method == "tune":
        steps = args.steps or 5
        res = D.tune(args.degree, steps, args.eps, args.x_lo)
        rows = [res.row]
        design = f"tuned: max a with phi in 1 +- {args.eps} on [{args.x_lo:g}, 1] after {steps} steps"
    else:
        steps = args.steps or 5
        sched = D.polar_express(args.degree, steps, args.l, safety=args.safety)
        rows = list(sched.rows)
        design = f"minimax: Polar Express, degree {args.degree}, l = {args.l:g}, {steps} steps, safety {args.safety}"
        print(f"guaranteed max |1 - sigma| for sigma in [{args.l:g}, 1] (before safety): {sched.final_error:.3g}")
    preset = C.Preset(
        name=args.name or f"{args.method}_d{args.degree}_k{steps}",
        rows=tuple(tuple(r) for r in rows),
        source="muonkit coeffs design",
        design=design,
        default_steps=steps,
        norm_scale=1.01 if args.method == "minimax" and args.safety > 1 else 1.0,
    )
    print(f"{preset.name}: {design}")
    for i, r in enumerate(preset.rows):
        print(f"  {i + 1}: ({', '.join(f'{v:.10g}' for v in r)})")
    lo, hi = D.band(preset.schedule(), args.x_lo)
    print(f"band on [{args.x_lo:g}, 1] after {steps} steps: [{lo:.4f}, {hi:.4f}]")
    if args.save:
        if Path(args.save).exists() and not args.force:
            raise ValueError(f"--save {args.save}: the file exists; pass --force to replace it")
        Path(args.save).write_text(preset.to_json())
        print(f"saved {args.save}  (use: muonkit.orthogonalize(G, {str(args.save)!r}))")
    return 0


def _plot(args: argparse.Namespace) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CoeffsError("plotting needs matplotlib: pip install 'muonkit[plot]'") from None
    import numpy as np

    presets = [_preset(n) for n in args.names]
    x = D.log_grid(args.x_lo, 1.0, 4001)
    fig, ax = plt.subplots(figsize=(7, 4.3), dpi=110)
    for p in presets:
        rows = p.schedule(args.steps)
        steps = D.compose(rows, x / p.norm_scale, keep_steps=True)
        line = ax.plot(x, steps[-1], label=f"{p.name} ({len(rows)} steps)")[0]
        if args.per_step:
            for k in range(1, len(rows)):
                ax.plot(x, steps[k], color=line.get_color(), alpha=0.25, lw=0.8)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhspan(1 - args.eps, 1 + args.eps, color="grey", alpha=0.12, label=f"1 +- {args.eps:g}")
    ax.set_xscale("log")
    ax.set_xlabel("input singular value x (after normalisation)")
    ax.set_ylabel("phi(x) after the schedule")
    ax.set_ylim(0, max(1.6, float(np.nanmax([D.band(p.schedule(args.steps), args.x_lo)[1] for p in presets])) + 0.1))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"plot: {args.out}")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("coeffs", help="Newton-Schulz coefficient lab: list, show, compare, design, plot")
    cs = p.add_subparsers(dest="coeffs_command", required=True)

    def quality(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--steps",
            type=number(1, 1000, integer=True),
            default=None,
            help="number of NS steps (default: the preset's)",
        )
        q.add_argument(
            "--x-lo", type=number(0, 1, open_low=True), default=1e-3, help="lower end of the x range for the band"
        )
        q.add_argument("--eps", type=number(0, 1, open_low=True), default=0.3, help="half-width of the band around 1")

    cs.add_parser("list", help="the built-in presets").set_defaults(func=_list)
    show = cs.add_parser("show", help="rows, provenance, fixed-point facts, band and cost of one preset")
    show.add_argument("name", help="preset name or saved .json preset")
    quality(show)
    show.set_defaults(func=_show)
    cmp_ = cs.add_parser("compare", help="a table of several presets (all by default)")
    cmp_.add_argument("names", nargs="*")
    quality(cmp_)
    cmp_.set_defaults(func=_compare)
    des = cs.add_parser("design", help="design a schedule: fixed-point, tune or minimax")
    des.add_argument("--method", required=True, choices=["fixed-point", "tune", "minimax"])
    des.add_argument("--degree", type=number(3, 31, integer=True), default=5)
    des.add_argument("--steps", type=number(1, 1000, integer=True), default=None)
    des.add_argument("--a", type=float, default=None, help="fixed-point: slope at 0 (default 1.99 cubic, 3.25 quintic)")
    des.add_argument("--eps", type=number(0, 1, open_low=True), default=0.3, help="tune: band half-width")
    des.add_argument("--x-lo", type=number(0, 1, open_low=True), default=1e-3, help="tune: lower end of the range")
    des.add_argument(
        "--l", type=number(0, 1, open_low=True), default=1e-3, help="minimax: lower bound on singular values"
    )
    des.add_argument("--safety", type=number(1, 2), default=1.01, help="minimax: safety factor (1 = none)")
    des.add_argument("--name", default=None)
    des.add_argument("--save", default=None, metavar="FILE.json")
    des.add_argument("--force", action="store_true", help="replace the --save file if it exists")
    des.set_defaults(func=_design)
    plot = cs.add_parser("plot", help="phi over x (log axis) with the band and y = 1")
    plot.add_argument("names", nargs="+")
    plot.add_argument("--out", required=True, metavar="FILE.png")
    plot.add_argument("--per-step", action="store_true", help="also draw the intermediate steps")
    quality(plot)
    plot.set_defaults(func=_plot)
