"""Speed and quality of orthogonalize against other implementations, same coefficients and steps.

Implementations (each skipped if not importable): muonkit plain NS, muonkit Gram NS, muonkit under
torch.compile, torch.optim.Muon's NS (2-D only: batched inputs run as a loop), KellerJordan's
``zeropower_via_newtonschulz5`` (muon-optimizer wheel), and the gram-newton-schulz package's torch path
(``ns_use_kernels=False``, its default torch.compile settings: reduce-overhead, i.e. CUDA graphs; it computes in
float16, so muonkit's float16 rows are its like-for-like comparison). All use Jordan's (3.4445, -4.7750, 2.0315)
for 5 steps. ``% peak`` counts standard NS FLOPs 5 (4 m^2 n + 2 m^3), m <= n, against a bf16 matmul
measured in the same run. Quality on inputs with singular values spread over [0.1, 1]: max |sigma - 1| and
the relative distance to the SVD polar factor.

    python benchmarks/orthogonalize.py --out benchmarks/results/orthogonalize_h100.json
    python benchmarks/orthogonalize.py --impls "muonkit,gram-newton-schulz" --reps 10  # the two the goal compares
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from _common import competitors, environment, matmul_peak_tflops, time_ms, write_json

import muonkit

SHAPES = [(768, 768), (768, 3072), (3072, 768), (1024, 4096), (4096, 4096), (4096, 14336), (8192, 8192)]
JORDAN = (3.4445, -4.7750, 2.0315)


def well_conditioned(batch: int, m: int, n: int, device: torch.device) -> torch.Tensor:
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(batch, m, k, device=device))
    V, _ = torch.linalg.qr(torch.randn(batch, n, k, device=device))
    s = torch.linspace(0.1, 1.0, k, device=device)
    return (U * s) @ V.mT


def without_graphs(fn: Any) -> Any:
    """``fn`` with muonkit's CUDA-graph replay of eager calls turned off while it runs."""

    def run(X: torch.Tensor) -> torch.Tensor:
        before = muonkit.accel.cuda_graphs.cuda_graphs_enabled()
        muonkit.accel.cuda_graphs.set_cuda_graphs(False)
        try:
            return fn(X)
        finally:
            muonkit.accel.cuda_graphs.set_cuda_graphs(before)

    return run


def implementations(device: torch.device, compile_muonkit: bool) -> dict[str, Any]:
    impls: dict[str, Any] = {
        "muonkit": lambda X: muonkit.orthogonalize(X, "jordan", 5, dtype=torch.bfloat16),
        "muonkit-gram": lambda X: muonkit.orthogonalize(X, "jordan", 5, method="gram", dtype=torch.bfloat16),
    }
    if device.type == "cuda":  # float16, as the gram-newton-schulz package computes: 3 more mantissa bits
        impls["muonkit [fp16]"] = lambda X: muonkit.orthogonalize(X, "jordan", 5, dtype=torch.float16)
        impls["muonkit-gram [fp16]"] = lambda X: muonkit.orthogonalize(
            X, "jordan", 5, method="gram", dtype=torch.float16
        )
        impls["muonkit [graphs off]"] = without_graphs(
            lambda X: muonkit.orthogonalize(X, "jordan", 5, dtype=torch.bfloat16)
        )
    if device.type == "cuda" and compile_muonkit:
        impls["muonkit+compile"] = torch.compile(
            lambda X: muonkit.orthogonalize(X, "jordan", 5, dtype=torch.bfloat16), dynamic=False
        )
    comp = competitors()
    if "torch.optim.Muon" in comp:
        ns = comp["torch.optim.Muon"]._zeropower_via_newtonschulz

        def torch_ns(X: torch.Tensor) -> torch.Tensor:
            if X.ndim == 2:
                return ns(X, JORDAN, 5, 1e-7)
            return torch.stack([ns(x, JORDAN, 5, 1e-7) for x in X])

        impls["torch.optim.Muon"] = torch_ns
    if "KellerJordan" in comp:
        impls["KellerJordan"] = lambda X: comp["KellerJordan"].zeropower_via_newtonschulz5(X, 5)
    if "gram-newton-schulz" in comp and device.type == "cuda":
        gns = comp["gram-newton-schulz"].GramNewtonSchulz(ns_use_kernels=False, ns_coefficients=[list(JORDAN)] * 5)
        impls["gram-newton-schulz"] = gns
    return impls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="orthogonalize.json")
    ap.add_argument("--batch", type=int, default=8, help="matrices per batched call (halved for large shapes)")
    ap.add_argument("--shapes", default=None, help="e.g. 768x768,1024x4096")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--compile", action="store_true", help="also time muonkit under torch.compile")
    ap.add_argument("--impls", default=None, help="comma-separated implementation names to run (default: all found)")
    ap.add_argument(
        "--quality-max-dim", type=int, default=4096, help="skip the SVD quality columns above this many rows or columns"
    )
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if args.shapes else SHAPES
    if device.type == "cpu" and not args.shapes:
        shapes = [(256, 256), (256, 1024), (1024, 256), (512, 2048)]
    peak = matmul_peak_tflops(device)
    print(f"{environment(device).get('gpu', 'CPU')}: measured matmul peak {peak:.0f} TFLOP/s")
    impls = implementations(device, args.compile)
    if args.impls:
        wanted = [name.strip() for name in args.impls.split(",")]
        unknown = [name for name in wanted if name not in impls]
        if unknown:
            ap.error(f"--impls: {', '.join(unknown)} not available here; available: {', '.join(impls)}")
        impls = {name: impls[name] for name in wanted}
    rows = []
    for m, n in shapes:
        small, big = min(m, n), max(m, n)
        flops_one = 5 * (4 * small * small * big + 2 * small**3)
        batch = args.batch if m * n <= 4096 * 4096 else max(1, args.batch // 4)
        for b in (1, batch):
            X = well_conditioned(b, m, n, device) if b > 1 else well_conditioned(1, m, n, device)[0]
            quality = max(m, n) <= args.quality_max_dim
            exact = muonkit.orthogonalize(X.float(), method="svd") if quality else None
            for name, fn in impls.items():
                try:
                    ms = time_ms(lambda fn=fn, X=X: fn(X), device, reps=args.reps)
                    O = fn(X).float()
                except Exception as err:  # a competitor that cannot run this shape: record why
                    rows.append(
                        {"impl": name, "shape": [m, n], "batch": b, "error": f"{type(err).__name__}: {err}"[:200]}
                    )
                    continue
                if exact is not None:
                    s_err = float((torch.linalg.svdvals(O.double()) - 1).abs().max())
                    rel = float((O - exact).norm() / exact.norm())
                else:
                    s_err = rel = float("nan")
                tflops = b * flops_one / (ms * 1e-3) / 1e12
                rows.append(
                    {
                        "impl": name,
                        "shape": [m, n],
                        "batch": b,
                        "ms": ms,
                        "tflops": tflops,
                        "pct_peak": 100 * tflops / peak,
                        "max_abs_sigma_minus_1": s_err,
                        "rel_err_vs_svd": rel,
                    }
                )
            print(f"  done {m}x{n} batch {b}", flush=True)
            del X, exact
    print(
        f"\n{'shape':>11} {'batch':>5} {'impl':<20} {'ms':>9} {'TFLOP/s':>8} {'% peak':>7} "
        f"{'max|s-1|':>9} {'vs SVD':>7} {'x muonkit':>9}"
    )
    base = {(tuple(r["shape"]), r["batch"]): r["ms"] for r in rows if r["impl"] == "muonkit" and "ms" in r}
    for r in rows:
        key = (tuple(r["shape"]), r["batch"])
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        if "error" in r:
            print(f"{shape:>11} {r['batch']:>5} {r['impl']:<20} {r['error'][:60]}")
            continue
        rel_speed = r["ms"] / base[key] if key in base else float("nan")
        r["ms_over_muonkit"] = rel_speed
        print(
            f"{shape:>11} {r['batch']:>5} {r['impl']:<20} {r['ms']:>9.3f} {r['tflops']:>8.1f} {r['pct_peak']:>7.1f} "
            f"{r['max_abs_sigma_minus_1']:>9.3f} {r['rel_err_vs_svd']:>7.3f} {rel_speed:>9.2f}"
        )
    write_json(args.out, {"environment": environment(device), "matmul_peak_tflops": peak, "rows": rows})


if __name__ == "__main__":
    main()
