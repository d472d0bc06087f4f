"""Gram NS on the CPU: what it would buy the demo's Muon step (``method="auto"`` runs plain NS off CUDA).

Times, on the CPU in float32, ``orthogonalize`` of the demo GPT's two NS batches with plain and Gram NS (mean of 20
calls) with each one's error against the exact polar factor, then the whole ``Muon.step`` of the demo model
(GPT small, QKV split in three) with ``method="auto"`` and ``method="gram"``, alternating step by step (medians
and quartiles of 30 each). Prints a table, writes JSON.

    python benchmarks/dev/cpu_gram.py --out benchmarks/dev/results/cpu_gram_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import _parent  # noqa: F401  (benchmarks/ on sys.path)
import torch
from _common import environment, write_json

import muonkit
from muonkit.train import GPT, SIZES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="cpu_gram.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    batches = []
    for shape in [(8, 128, 512), (16, 128, 128)]:
        G = torch.randn(*shape)
        polar = muonkit.orthogonalize(G, method="svd")
        row = {"shape": list(shape)}
        for method in ("newton_schulz", "gram"):
            muonkit.orthogonalize(G, method=method)
            start = time.perf_counter()
            for _ in range(20):
                O = muonkit.orthogonalize(G, method=method)
            row[f"{method}_ms"] = (time.perf_counter() - start) / 20 * 1e3
            row[f"{method}_error"] = float((O - polar).norm() / polar.norm())
        batches.append(row)
        print(f"{shape}: plain {row['newton_schulz_ms']:.2f} ms (error {row['newton_schulz_error']:.3e}), "
              f"Gram {row['gram_ms']:.2f} ms (error {row['gram_error']:.3e})")  # fmt: skip
    model = GPT(SIZES["small"])
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    groups = lambda: muonkit.param_groups(model, split={"*.qkv.weight": 3})
    opts = {m: muonkit.Muon(groups(), lr=0.04, weight_decay=0.01, adamw_lr=2e-3, method=m) for m in ("auto", "gram")}
    times: dict[str, list[float]] = {m: [] for m in opts}
    for opt in opts.values():
        for _ in range(3):
            opt.step()
    for i in range(args.steps):
        for method in ("auto", "gram") if i % 2 == 0 else ("gram", "auto"):
            start = time.perf_counter()
            opts[method].step()
            times[method].append((time.perf_counter() - start) * 1e3)
    steps = {}
    for method, ts in times.items():
        q1, q2, q3 = statistics.quantiles(ts, n=4)
        steps[method] = {"median_ms": q2, "q1_ms": q1, "q3_ms": q3}
        print(f"Muon step, method={method!r}: median {q2:.2f} ms (quartiles {q1:.2f}-{q3:.2f})")
    write_json(args.out, {"environment": environment(torch.device("cpu")), "batches": batches, "step": steps})


if __name__ == "__main__":
    main()
