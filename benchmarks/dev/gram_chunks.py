"""Experiment: Gram NS over a batch in chunks, so that a chunk's ``m x m`` matrices stay in the L2 cache.

At 768 rows a Gram-space product (``R R``, ``P Q``, ``P R``) moves about as many bytes as it computes: for
GPT-2 small's 24 matrices of ``768 x 3072`` each ``m x m`` tensor is 28 MB in bf16, and the symmetric kernel
takes 0.035-0.038 ms per product there, no faster than cuBLAS's full product
(``kernel_configs_h100_wide.json``). R, P, Q and ``P R`` of the whole batch (4 x 28 MB) exceed an H100's
50 MB L2; those of a chunk of 6 matrices (4 x 7 MB) do not. This times Gram NS (muonkit's, Jordan's
coefficients, 5 steps, the default restart) on each batch whole and in chunks run one after another, all
inside one CUDA graph (as the step replays it), median of replays:

    python benchmarks/dev/gram_chunks.py --out gram_chunks.json     # needs CUDA
"""

from __future__ import annotations

import argparse
from typing import Any

import _parent  # noqa: F401  (benchmarks/ on sys.path)
import torch
import triton
from _common import environment, write_json

from muonkit import newton_schulz
from muonkit.accel import kernels
from muonkit.coefficients import as_preset

BATCHES = [(24, 768, 3072), (12, 768, 2304), (64, 2048, 8192)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default=None, help="e.g. 24x768x3072,12x768x2304")
    ap.add_argument("--chunks", default="1,2,3,4,6,8,12", help="chunk sizes tried besides the whole batch")
    ap.add_argument("--out", default="gram_chunks.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    batches = [tuple(map(int, s.split("x"))) for s in args.batches.split(",")] if args.batches else BATCHES
    rows = as_preset("jordan").schedule(5)
    restarts = newton_schulz.gram_restarts(len(rows))
    kernels.set_mode("auto")
    gen = torch.Generator(device=device).manual_seed(0)
    results: list[dict[str, Any]] = []
    for b, m, n in batches:
        X = torch.randn(b, m, n, device=device, generator=gen).bfloat16()
        d = X.float().norm(dim=(1, 2)) + 1e-7

        def run(chunk: int, X: torch.Tensor = X, d: torch.Tensor = d, b: int = b) -> list[torch.Tensor]:
            return [
                newton_schulz.iteration._gram_newton_schulz(X[i : i + chunk], rows, restarts, d[i : i + chunk])
                for i in range(0, b, chunk)
            ]

        whole = None
        for chunk in [b, *sorted({int(c) for c in args.chunks.split(",") if int(c) < b}, reverse=True)]:
            with kernels.capture_warmup():  # tile sizes timed for the chunk's shapes, as before a capture
                out = torch.cat(run(chunk))
            torch.cuda.synchronize()
            if whole is None:
                whole = out
            ms = float(triton.testing.do_bench_cudagraph(lambda chunk=chunk: run(chunk), rep=200, return_mode="median"))
            row = {
                "batch": [b, m, n],
                "chunk": chunk,
                "ms": ms,
                "max_abs_diff_vs_whole": float((out.float() - whole.float()).abs().max()),
            }
            results.append(row)
            base = next(r["ms"] for r in results if r["batch"] == [b, m, n] and r["chunk"] == b)
            print(
                f"{b}x{m}x{n} chunks of {chunk:>2}: {ms:.4f} ms ({base / ms:.2f}x whole), "
                f"max |diff| vs whole {row['max_abs_diff_vs_whole']:.1e}",
                flush=True,
            )
    write_json(args.out, {"environment": environment(device), "restarts": list(restarts), "rows": results})


if __name__ == "__main__":
    main()
