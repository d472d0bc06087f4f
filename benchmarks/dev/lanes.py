"""How the step's NS batches are cut and laid on the two streams ("lanes"): one GPT-2-small step per variant.

The products of an NS batch are compute-heavy and its momentum and update passes memory-bound; two lanes
gain only where one lane's memory-bound pass meets the other's products. Variants of Muon's ``max_batch``
(``12`` splits GPT-2 small's 24 MLP matrices into two batches, so the lanes hold four), alternated over
``--rounds`` rounds (a fresh optimizer, plan and CUDA graphs each time). Per variant: the median over rounds
of ``alone_breakdown.breakdown``'s medians (GPU time from the first replay, the whole step synchronised
before and after) and of the back-to-back time. (Commit 561b830 also tried the side lane's batches smallest
first: no gain, ``lanes_*_h100.json``.)

    python benchmarks/dev/lanes.py --method gram --nosplit --out lanes.json       # needs CUDA
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import _parent  # noqa: F401  (benchmarks/ on sys.path)
import torch
from _common import environment, time_ms_pipelined, write_json
from alone_breakdown import breakdown
from step import SETS, add_set_arguments, make_params, split_groups

import muonkit
from muonkit.accel import cuda_graphs
from muonkit.optim import plans, remembered


def measure(params: list, nosplit: bool, method: str, max_batch: int | None, reps: int) -> dict[str, float]:
    plans._PLANS.clear()  # plans are shared by structure and remembered by state: make this variant's
    remembered._REMEMBERED.clear()
    cuda_graphs.cache.clear()
    opt = muonkit.Muon(params if nosplit else split_groups(params), method=method, nonfinite="ignore",
                       max_batch=max_batch)  # fmt: skip
    for _ in range(5):
        opt.step()
    lanes = [(b.size, b.m, b.n, b.lane) for b in remembered._REMEMBERED[0].plan.batches]  # in launch order
    result = breakdown(opt, reps)
    result["back_to_back_ms"] = time_ms_pipelined(opt.step, torch.device("cuda"), reps=reps)
    result["finite"] = float(all(bool(torch.isfinite(p).all()) for p in params))
    result["batches"] = lanes  # type: ignore[assignment]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_set_arguments(ap, method="gram")
    ap.add_argument("--max-batches", default="0,12", help="Muon's max_batch per variant (0: none)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda")
    layers, shapes = SETS[args.set]
    params = make_params(layers, shapes, device)
    variants = [int(x) or None for x in args.max_batches.split(",")]
    runs: dict[int | None, list[dict[str, Any]]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for max_batch in variants:
            res = measure(params, args.nosplit, args.method, max_batch, args.reps)
            runs[max_batch].append(res)
            print(f"round {r}: max_batch {max_batch}: GPU after first {res['gpu_after_first_ms']:.3f} ms, alone "
                  f"{res['alone_ms']:.3f}, back to back {res['back_to_back_ms']:.3f}; batches (b, m, n, lane) "
                  f"{res['batches']}", flush=True)  # fmt: skip
    rows = []
    keys = ("gpu_after_first_ms", "alone_ms", "back_to_back_ms", "host_to_first_ms")
    print(f"\n{'max_batch':>9} " + " ".join(f"{k:>19}" for k in keys))
    for max_batch, res in runs.items():
        row = {"max_batch": max_batch, "batches": res[0]["batches"], "finite": all(x["finite"] for x in res)}
        for k in keys:
            row[k] = statistics.median(x[k] for x in res)
            row[k + "_rounds"] = [x[k] for x in res]
        rows.append(row)
        print(f"{max_batch or '-':>9} " + " ".join(f"{row[k]:>19.3f}" for k in keys))
    if args.out:
        write_json(args.out, {"environment": environment(device), "set": args.set, "method": args.method,
                              "nosplit": args.nosplit, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
