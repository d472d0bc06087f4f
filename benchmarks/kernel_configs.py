"""Every tile configuration of the Triton symmetric-product kernel, timed on the NS batches of a model.

The kernel's tuner tries only ``kernels.CONFIGS``; this sweeps a wider grid (BM, BK, warps, stages) to
show how far that short list is from the best the kernel can do, per batch shape:

    python benchmarks/kernel_configs.py --out benchmarks/results/kernel_configs_h100.json   # needs CUDA

Per shape: X X^T (``(b, m, k)``, no Y) and the step polynomial (``(b, m, m)`` with Y), ms for each config
(CUDA events, median), effective TFLOP/s on the computed work (``b m^2 k`` multiply-adds: half the full
product), the best config of the grid and of ``CONFIGS``, and cuBLAS's full product for reference.
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import torch
from _common import environment, time_ms, write_json

from muonkit import kernels

# NS batches of GPT-2 small (QKV split: 48 squares, 24 of 768 x 3072) and of the 1B set
SHAPES = [(48, 768, 768), (24, 768, 3072), (64, 2048, 2048), (32, 2048, 8192)]
GRID = [
    cfg
    for cfg in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4, 5))
    if not (cfg[0] == 64 and cfg[2] == 8)  # 64 x 64 tiles on 8 warps: too little work per warp
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help="e.g. 48x768x768,24x768x3072")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="kernel_configs.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if args.shapes else SHAPES
    kernels.set_mode("triton")
    rows: list[dict[str, Any]] = []
    for b, m, k in shapes:
        X = torch.randn(b, m, k, device=device, dtype=torch.bfloat16) / k**0.5
        A = (X @ X.mT).contiguous()
        for has_y, inp, kk in ((False, X, k), (True, A, m)):
            key = (b, m, kk, has_y, torch.bfloat16)

            def call(inp: torch.Tensor = inp, has_y: bool = has_y) -> torch.Tensor:
                if has_y:
                    return kernels.sym_product(inp, alpha=2.0, beta=-4.7, Y=inp, diag=3.4)
                return kernels.sym_product(inp)

            cublas = time_ms(lambda inp=inp: torch.bmm(inp, inp.mT), device, reps=args.reps)
            macs = b * m * m * kk
            times: dict[str, float] = {}
            for cfg in GRID:
                kernels._best[key] = cfg
                try:
                    times[str(cfg)] = time_ms(call, device, reps=args.reps)
                except Exception as err:  # out of shared memory or registers: not a usable config
                    times[str(cfg)] = float("nan")
                    print(f"  {cfg}: {type(err).__name__}", flush=True)
            ok = {c: t for c, t in times.items() if t == t}
            best = min(ok, key=ok.__getitem__)
            listed = min((str(c) for c in kernels.CONFIGS), key=lambda c: ok.get(c, float("inf")))
            kernels._best.pop(key, None)
            row = {
                "shape": [b, m, kk],
                "has_y": has_y,
                "cublas_full_ms": cublas,
                "ms": times,
                "best": best,
                "best_ms": ok[best],
                "best_tflops": macs / ok[best] / 1e9,  # the computed half: b m^2 k / 2 multiply-adds, 2 FLOPs each
                "best_of_configs": listed,
                "best_of_configs_ms": ok[listed],
            }
            rows.append(row)
            print(
                f"{b}x{m}x{kk} {'poly' if has_y else 'XX^T'}: best {best} {ok[best]:.3f} ms "
                f"({row['best_tflops']:.0f} TFLOP/s on the computed half), CONFIGS' best {listed} "
                f"{ok[listed]:.3f} ms, cuBLAS full product {cublas:.3f} ms",
                flush=True,
            )
    write_json(args.out, {"environment": environment(device), "grid": [list(c) for c in GRID], "rows": rows})


if __name__ == "__main__":
    main()
