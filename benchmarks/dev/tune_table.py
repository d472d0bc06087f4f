"""What Jordan-style constrained tuning finds for degree 3, 5, 7 and 3-7 steps.

Constraint: phi (one polynomial repeated k times) within 1 +- eps for every x in [x_lo, 1];
objective: the largest slope at zero a. Also reports whether each built-in preset satisfies the same
constraint. Prints a table and writes JSON.

    python benchmarks/dev/tune_table.py --eps 0.3 --x-lo 1e-3 --out benchmarks/dev/results/tune_table.json
"""

from __future__ import annotations

import argparse
import json
import time

from muonkit import coefficients as C
from muonkit import design as D


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--x-lo", type=float, default=1e-3)
    ap.add_argument("--degrees", default="3,5,7")
    ap.add_argument("--steps", default="3,4,5,6,7")
    ap.add_argument("--out", default="tune_table.json")
    args = ap.parse_args()
    rows = []
    print(f"max a with phi in 1 +- {args.eps} on [{args.x_lo:g}, 1]")
    print(f"{'degree':>6} {'steps':>5}  {'a':>8}  {'phi(0)=a^k':>11}  row")
    for degree in map(int, args.degrees.split(",")):
        for steps in map(int, args.steps.split(",")):
            t0 = time.perf_counter()
            try:
                res = D.tune(degree, steps, args.eps, args.x_lo)
                entry = {"degree": degree, "steps": steps, "row": list(res.row), "a": res.a}
                shown = f"{res.a:>8.4f}  {res.a**steps:>11.4g}  ({', '.join(f'{v:.4f}' for v in res.row)})"
            except ValueError as err:
                entry = {"degree": degree, "steps": steps, "row": None, "infeasible": str(err)}
                shown = f"{'-':>8}  {'-':>11}  infeasible"
            entry["seconds"] = time.perf_counter() - t0
            rows.append(entry)
            print(f"{degree:>6} {steps:>5}  {shown}", flush=True)
    presets = {}
    print("\nbuilt-in presets at their default steps against the same constraint:")
    for name in C.list_presets():
        p = C.get(name)
        lo, hi = D.band(p.schedule(), args.x_lo, n=20001)
        ok = lo >= 1 - args.eps and hi <= 1 + args.eps
        presets[name] = {"band": [lo, hi], "satisfies": ok}
        print(f"  {name:<20} band [{lo:.4f}, {hi:.4f}]  {'satisfies' if ok else 'violates'}")
    with open(args.out, "w") as f:
        json.dump({"eps": args.eps, "x_lo": args.x_lo, "tuned": rows, "presets": presets}, f, indent=2)


if __name__ == "__main__":
    main()
