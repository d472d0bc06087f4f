"""Where Gram NS beats plain NS: time and accuracy of both against the aspect ratio ``n / m`` of the matrices.

``method="auto"`` (the default) runs Gram NS on CUDA for matrices at least ``GRAM_MIN_ASPECT`` times as wide as
tall. This program measures, per shape ``(b, m, n)``, ``orthogonalize`` in bf16 with Jordan's coefficients
(5 steps, CUDA graphs as the optimizer uses them) with each method, back to back, and each one's relative
Frobenius error against the same polynomials in float64 on Gaussian and log-spread inputs (singular values
log-uniform over [1e-4, 1]).

    python benchmarks/dev/gram_aspect.py --out benchmarks/dev/results/gram_aspect_h200.json
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

import _parent  # noqa: F401  (benchmarks/ on sys.path)
import torch
from _common import environment, time_ms_pipelined, write_json
from gram_restarts import make_input

import muonkit

ASPECTS = (1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
SIDES = ((768, (1, 8, 24)), (1024, (1, 8)), (2048, (1, 4)), (4096, (1,)))


def relative_error(G: torch.Tensor, method: str) -> float:
    ref = muonkit.orthogonalize(G, "jordan", dtype=torch.float64, method="newton_schulz")
    out = muonkit.orthogonalize(G.float(), "jordan", dtype=torch.bfloat16, method=method)
    return float((out.double() - ref).norm() / ref.norm())


def measure(b: int, m: int, n: int, device: torch.device, reps: int) -> dict[str, Any]:
    G = torch.randn(b, m, n, device=device)
    row: dict[str, Any] = {"b": b, "m": m, "n": n, "aspect": n / m}
    for method in ("newton_schulz", "gram"):
        call = functools.partial(muonkit.orthogonalize, G, method=method, dtype=torch.bfloat16)
        row[f"ms_{method}"] = time_ms_pipelined(call, device, warmup=3, reps=reps)
        for spectrum in ("gaussian", "log-spread"):
            row[f"err_{method}_{spectrum}"] = relative_error(make_input(spectrum, min(b, 4), m, n, device), method)
    row["gram_over_plain"] = row["ms_gram"] / row["ms_newton_schulz"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default="gram_aspect.json")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows: list[dict[str, Any]] = []
    env = environment(device)
    print(f"{'b':>3} {'m':>5} {'n':>6} {'n/m':>5} {'plain ms':>9} {'gram ms':>8} {'gram/plain':>10} "
          f"{'err plain':>10} {'err gram':>9} {'gram/plain err, log-spread':>27}")  # fmt: skip
    for m, batches in SIDES:
        for b in batches:
            for aspect in ASPECTS:
                r = measure(b, m, round(aspect * m), device, args.reps)
                rows.append(r)
                spread = r["err_gram_log-spread"] / r["err_newton_schulz_log-spread"]
                print(f"{b:>3} {m:>5} {r['n']:>6} {aspect:>5.2f} {r['ms_newton_schulz']:>9.3f} {r['ms_gram']:>8.3f} "
                      f"{r['gram_over_plain']:>10.3f} {r['err_newton_schulz_gaussian']:>10.2e} "
                      f"{r['err_gram_gaussian']:>9.2e} {spread:>27.2f}", flush=True)  # fmt: skip
                # after every row, so that a run cut short by a time limit keeps what it measured
                Path(args.out).write_text(json.dumps({"environment": env, "args": vars(args), "rows": rows}))
    write_json(args.out, {"environment": env, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
