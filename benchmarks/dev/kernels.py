"""The Triton symmetric-product kernel against torch matmul: X X^T alone, and whole NS5 orthogonalizations.

    python benchmarks/dev/kernels.py --out kernels_h100.json        # needs CUDA and Triton

For each shape (bf16, Jordan's coefficients, 5 steps): ms of ``X X^T`` with torch and with the kernel (it
computes the upper-triangle tiles and mirrors them), the largest difference between the two, then ms of
``orthogonalize`` with kernel mode "torch" and "triton" (plain NS and Gram NS), and the largest difference
of the NS outputs. Ratios are from the same run.
"""

from __future__ import annotations

import argparse

import _parent  # noqa: F401  (benchmarks/ on sys.path)
import torch
from _common import environment, time_ms, write_json

import muonkit
from muonkit.accel import kernels

SHAPES = [(8, 768, 768), (8, 768, 3072), (8, 1024, 4096), (1, 4096, 4096), (1, 4096, 14336), (1, 8192, 8192)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="kernels.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for b, m, n in SHAPES:
        X = torch.randn(b, m, n, device=device, dtype=torch.bfloat16, generator=gen) / n**0.5
        kernels.set_mode("torch")
        ref = X @ X.mT
        t_torch = time_ms(lambda X=X: X @ X.mT, device, reps=args.reps)
        kernels.set_mode("triton")
        got = kernels.sym_product(X)
        t_tri = time_ms(lambda X=X: kernels.sym_product(X), device, reps=args.reps)
        row = {
            "shape": [b, m, n],
            "xxt_torch_ms": t_torch,
            "xxt_triton_ms": t_tri,
            "xxt_max_abs_diff": float((got.float() - ref.float()).abs().max()),
            "xxt_exactly_symmetric": bool(torch.equal(got, got.mT)),
        }
        G = torch.randn(b, m, n, device=device, generator=gen)
        for method in ("newton_schulz", "gram"):
            outs = {}
            for mode in ("torch", "triton"):
                kernels.set_mode(mode)
                outs[mode] = muonkit.orthogonalize(G, method=method)
                row[f"ns_{method}_{mode}_ms"] = time_ms(
                    lambda G=G, method=method: muonkit.orthogonalize(G, method=method), device, reps=args.reps
                )
            row[f"ns_{method}_max_abs_diff"] = float((outs["torch"].float() - outs["triton"].float()).abs().max())
        kernels.set_mode("torch")
        rows.append(row)
        print(
            f"{b}x{m}x{n}: XX^T torch {t_torch:.3f} ms, triton {t_tri:.3f} ms ({t_tri / t_torch:.2f}x), "
            f"diff {row['xxt_max_abs_diff']:.2e}, symmetric {row['xxt_exactly_symmetric']}; "
            f"NS torch {row['ns_newton_schulz_torch_ms']:.3f} / triton {row['ns_newton_schulz_triton_ms']:.3f} ms "
            f"(diff {row['ns_newton_schulz_max_abs_diff']:.2e}); Gram NS torch {row['ns_gram_torch_ms']:.3f} / "
            f"triton {row['ns_gram_triton_ms']:.3f} ms",
            flush=True,
        )
    tuned = {str(k[:4]): v for k, v in kernels._best.items()}  # (batch, m, k, has Y) -> (BM, BK, warps, stages)
    print("tuned tile configs:", tuned)
    write_json(args.out, {"environment": environment(device), "rows": rows, "tuned_configs": tuned})


if __name__ == "__main__":
    main()
