"""Pre-conditioning before Newton-Schulz: how many NS steps each precondition stage needs for a given accuracy.

For gradient-like matrices (singular values spread log-uniformly over [1e-3, 1] or [1e-5, 1], and Gaussian ones) the
program runs Jordan's quintic for 1..8 steps after each precondition stage (``muonkit.optim.pipeline``: ``none`` =
the Frobenius normalisation, ``aol`` = Turbo-Muon's AOL rescaling, ``schatten4`` = CANS's Schatten-4 normalisation,
``row_norm`` = MuonEq's row normalisation) and
reports two measures per step count, in float64 (the counts do not depend on the hardware):

- lifted: the fraction of the output's singular values at or above 0.5. Jordan's coefficients do not converge to 1:
  they push every singular value into a band around it (about [0.7, 1.2]) and then oscillate there, so an
  orthogonality error ``||O O^T - I||`` stops falling at the band's width; what more steps buy is lifting the small
  singular values of a decaying spectrum into the band, which this counts;
- direction: ``||O - U V^T||_F / sqrt(m)`` against the polar factor of the *original* matrix (a stage that rescales
  rows changes the matrix, so it also changes which orthogonal matrix NS approaches).

Then, per stage, the fewest steps that lift as large a fraction as plain NS does in 5. Prints a table, writes
JSON.

    python benchmarks/precondition.py --out benchmarks/results/precondition_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from muonkit.coefficients import as_preset
from muonkit.optim.pipeline import get_stage
from muonkit.train.report import environment

STAGES = ("none", "aol", "schatten4", "row_norm")


def matrices(kind: str, m: int, n: int, count: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(count, m, n, generator=g, dtype=torch.float64)
    low = {"log1e-3": -3.0, "log1e-5": -5.0}[kind]
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(count, m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(count, n, k, generator=g, dtype=torch.float64))
    s = torch.logspace(low, 0, k, dtype=torch.float64)
    return (U * s) @ V.mT


def ns(X: torch.Tensor, steps: int) -> torch.Tensor:
    """Jordan's quintic on a wide batch whose spectral norm is at most 1."""
    for a, b, c in as_preset("jordan").schedule(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X


def measures(G: torch.Tensor, stage: str, steps: int) -> tuple[float, float]:
    """(fraction of singular values lifted to >= 0.5, direction error) after ``steps`` NS steps behind ``stage``."""
    pre = get_stage("precondition", stage)
    X = pre.fast(G).double() if stage != "none" else G
    if not pre.normalises:
        X = X / torch.linalg.matrix_norm(X, keepdim=True).clamp_min(1e-300)
    O = ns(X, steps)
    lifted = (torch.linalg.svdvals(O) >= 0.5).double().mean()
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    direction = torch.linalg.matrix_norm(O - U @ Vh) / math.sqrt(G.shape[-2])
    return float(lifted), float(direction.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="128x128,128x512,256x1024")
    ap.add_argument("--count", type=int, default=8, help="matrices per shape and spectrum")
    ap.add_argument("--max-steps", type=int, default=8)
    ap.add_argument("--out", default="precondition.json")
    args = ap.parse_args()
    rows = []
    print(f"{'spectrum':<10}{'shape':<10}{'stage':<10}" + "".join(f"{k:>9}" for k in range(1, args.max_steps + 1))
          + "   steps to plain NS5's lift")  # fmt: skip
    for kind in ("log1e-3", "log1e-5", "gaussian"):
        for shape in args.shapes.split(","):
            m, n = (int(v) for v in shape.split("x"))
            G = matrices(kind, m, n, args.count, seed=m + n)
            target = measures(G, "none", 5)[0]
            for stage in STAGES:
                errs = [measures(G, stage, k) for k in range(1, args.max_steps + 1)]
                needed = next((k for k, (f, _) in enumerate(errs, 1) if f >= target - 1e-12), None)
                rows.append({"spectrum": kind, "shape": [m, n], "stage": stage, "lifted": [f for f, _ in errs],
                             "direction": [d for _, d in errs], "steps_to_plain_ns5": needed})  # fmt: skip
                line = "".join(f"{o:9.4f}" for o, _ in errs)
                print(f"{kind:<10}{shape:<10}{stage:<10}{line}   {needed}")
                print(f"{'':<20}{'(dir.)':<10}" + "".join(f"{d:9.4f}" for _, d in errs))
    with open(args.out, "w") as f:
        json.dump({"meta": {"count": args.count, **environment("cpu")}, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
