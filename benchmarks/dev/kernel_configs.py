"""Every tile configuration of the Triton symmetric-product kernel, timed on the NS batches of a model.

The kernel's tuner tries only ``kernels.CONFIGS``; this sweeps a wider grid (BM, BK, warps, stages) to show
how far that short list is from the best the kernel can do, per batch shape:

    python benchmarks/dev/kernel_configs.py --out benchmarks/dev/results/kernel_configs_h100.json   # needs CUDA
    python benchmarks/dev/kernel_configs.py --graphs --grid tuner --shapes 24x768x3072 --products xxt,poly,gram

Per shape: X X^T (``(b, m, k)``, no Y), the step polynomial (``(b, m, m)`` with Y) and Gram NS's product of
two commuting symmetric matrices (``(b, m, m)`` with W), ms for each config (CUDA events, median; with
``--graphs`` each call replayed from a CUDA graph, as the eager step runs it), effective TFLOP/s on the
useful work (``b m^2 k`` multiply-adds: half the full product), the best config of the grid and of
``CONFIGS``, and cuBLAS's full product for reference.
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import _parent  # noqa: F401  (benchmarks/ on sys.path)
import torch
from _common import environment, time_ms, write_json

from muonkit.accel import kernels

# NS batches of GPT-2 small (QKV split: 48 squares, 24 of 768 x 3072; not split: 12 of 768 x 2304) and of the
# 1B set
SHAPES = [(48, 768, 768), (24, 768, 3072), (12, 768, 2304), (12, 768, 768), (64, 2048, 2048), (32, 2048, 8192)]
GRID = [
    cfg
    for cfg in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4, 5))
    if not (cfg[0] == 64 and cfg[2] == 8)  # 64 x 64 tiles on 8 warps: too little work per warp
]
GRIDS = {"all": GRID, "tuner": None}  # tuner: kernels.CONFIGS


def graph_time_ms(fn: Any, reps: int) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph (Triton's ``do_bench_cudagraph``)."""
    import triton

    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=reps, return_mode="median"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help="e.g. 48x768x768,24x768x3072")
    ap.add_argument("--grid", choices=sorted(GRIDS), default="all")
    ap.add_argument("--products", default="xxt,poly", help="any of xxt, poly, gram (comma-separated)")
    ap.add_argument("--graphs", action="store_true", help="time each call replayed from a CUDA graph")
    ap.add_argument("--reps", type=int, default=20, help="timed calls (with --graphs: ms of replays)")
    ap.add_argument("--out", default="kernel_configs.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if args.shapes else SHAPES
    grid = GRIDS[args.grid] or list(kernels.CONFIGS)
    products = args.products.split(",")
    if not set(products) <= {"xxt", "poly", "gram"}:
        ap.error(f"--products: unknown {sorted(set(products) - {'xxt', 'poly', 'gram'})}")

    def timed(fn: Any) -> float:
        return graph_time_ms(fn, args.reps) if args.graphs else time_ms(fn, device, reps=args.reps)

    kernels.set_mode("triton")
    rows: list[dict[str, Any]] = []
    for b, m, k in shapes:
        X = torch.randn(b, m, k, device=device, dtype=torch.bfloat16) / k**0.5
        A = (X @ X.mT).contiguous()
        P = kernels.sym_product(A, alpha=2.0, beta=-4.7, Y=A, diag=3.4)  # a polynomial in A: commutes with A
        cases = {"xxt": (X, k, {}), "poly": (A, m, dict(alpha=2.0, beta=-4.7, Y=A, diag=3.4)), "gram": (P, m, {"W": A})}
        for product in products:
            inp, kk, kw = cases[product]
            key = (b, m, kk, product == "poly", torch.bfloat16, False, True)  # kernels._tune's key: whole storage
            full = kw.get("W", inp)

            def call(inp: torch.Tensor = inp, kw: dict = kw) -> torch.Tensor:
                return kernels.sym_product(inp, **kw)

            cublas = timed(lambda inp=inp, full=full: torch.bmm(inp, full.mT))
            ref = (inp.double() @ full.double().mT).float()
            macs = b * m * m * kk
            times: dict[str, float] = {}
            errors: dict[str, float] = {}
            for cfg in grid:
                kernels._best[key] = cfg
                try:
                    times[str(cfg)] = timed(call)
                    out = call()
                    assert torch.equal(out, out.mT), f"{cfg}: not exactly symmetric"
                    if product != "poly":
                        errors[str(cfg)] = float((out.float() - ref).norm() / ref.norm())
                except Exception as err:  # out of shared memory or registers: not a usable config
                    times[str(cfg)] = float("nan")
                    print(f"  {cfg}: {type(err).__name__}", flush=True)
            ok = {c: t for c, t in times.items() if t == t}
            best = min(ok, key=ok.__getitem__)
            listed = min((str(c) for c in kernels.CONFIGS), key=lambda c: ok.get(c, float("inf")))
            kernels._best.pop(key, None)
            row = {
                "shape": [b, m, kk],
                "product": product,
                "has_y": product == "poly",
                "graphs": args.graphs,
                "cublas_full_ms": cublas,
                "ms": times,
                "rel_err_vs_float64": errors,
                "best": best,
                "best_ms": ok[best],
                "best_tflops": macs / ok[best] / 1e9,  # the useful half: b m^2 k / 2 multiply-adds, 2 FLOPs each
                "best_of_configs": listed,
                "best_of_configs_ms": ok.get(listed),
            }
            rows.append(row)
            print(
                f"{b}x{m}x{kk} {product}: best {best} {ok[best]:.4f} ms "
                f"({row['best_tflops']:.0f} TFLOP/s on the useful half), CONFIGS' best {listed} "
                f"{ok.get(listed, float('nan')):.4f} ms, cuBLAS full product {cublas:.4f} ms",
                flush=True,
            )
    write_json(
        args.out,
        {"environment": environment(device), "grid": [list(c) for c in grid], "graphs": args.graphs, "rows": rows},
    )


if __name__ == "__main__":
    main()
