"""Experiment: do the NS batches of one Muon step overlap when run on two CUDA streams?

A step's merged batches (GPT-2 small: the 768 x 768 batch and the 768 x 3072 batch) each run memory-bound
kernels (momentum, update) and compute-bound ones (the NS products). On one stream they run one after the
other; on two streams the block scheduler may fill one batch's idle SMs (wave tails, the element-wise
passes) with the other's work. This times, per NS method: one optimizer over all matrices (what ``Muon``
does), two optimizers (one per batch) stepped one after the other on one stream, and the same two on two
streams; each alone (synchronised) and back to back.

    python benchmarks/dev/streams.py --out streams.json
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

import _parent  # noqa: F401  (benchmarks/ on sys.path)
import torch
from _common import environment, time_ms, time_ms_pipelined, write_json
from step import SETS, make_params

import muonkit


def variants(method: str, qkv: list, sq: list, rect: list) -> dict[str, Callable[[], None]]:
    """The three ways to step the same matrices with NS ``method``."""
    make = functools.partial(muonkit.Muon, method=method, nonfinite="ignore")
    whole = make([{"params": qkv, "split": 3}, {"params": sq + rect}])
    a = make([{"params": qkv, "split": 3}, {"params": sq}])
    b = make([{"params": rect}])
    cur = torch.cuda.current_stream()
    side = [torch.cuda.Stream(), torch.cuda.Stream()]

    def one_stream() -> None:
        a.step()
        b.step()

    def two_streams() -> None:
        for s, opt in zip(side, (a, b)):
            s.wait_stream(cur)
            with torch.cuda.stream(s):
                opt.step()
        for s in side:
            cur.wait_stream(s)

    return {"one optimizer": whole.step, "two, one stream": one_stream, "two, two streams": two_streams}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="gpt2-small", choices=sorted(SETS))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="streams.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    layers, shapes = SETS[args.set]
    params = make_params(layers, shapes, device)
    qkv = [p for p in params if p.shape[0] == 3 * p.shape[1]]  # split in three: square matrices
    sq = [p for p in params if p.shape[0] == p.shape[1]]
    rect = [p for p in params if p.shape[0] not in (p.shape[1], 3 * p.shape[1])]
    rows: list[dict[str, Any]] = []
    for method in ("newton_schulz", "gram"):
        for name, fn in variants(method, qkv, sq, rect).items():
            for _ in range(3):  # state, then the whole-batch graphs' capture
                fn()
            torch.cuda.synchronize()
            ms = time_ms(fn, device, warmup=2, reps=args.reps)
            ms_b2b = time_ms_pipelined(fn, device, warmup=2, reps=args.reps)
            rows.append({"set": args.set, "method": method, "variant": name, "ms": ms, "ms_pipelined": ms_b2b})
            print(f"{args.set:<11} {method:<14} {name:<18} {ms:7.3f} ms alone {ms_b2b:7.3f} ms back to back")
        muonkit.accel.cuda_graphs.cache.clear()
    write_json(args.out, {"environment": environment(device), "rows": rows})


if __name__ == "__main__":
    main()
