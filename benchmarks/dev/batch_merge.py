"""Does one NS batch per shape beat one per parameter group? GPT-2-small's NS batches as the step forms them.

``Muon`` with the fused QKV split in its own group orthogonalizes 768x768 matrices in two batches (36 QKV parts,
12 attention projections) and 768x3072 ones in two (12 MLP-in transposed, 12 MLP-out); merged across groups
and orientations that is one batch of 48 and one of 24. Times the NS products of both layouts (each batch as
a cached CUDA graph, as the step runs them; input copied in by ``fill``), synchronised per call and back to
back.

    python benchmarks/dev/batch_merge.py --out benchmarks/dev/results/batch_merge_h100.json
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import _parent  # noqa: F401  (benchmarks/ on sys.path)
import torch
from _common import environment, time_ms, time_ms_pipelined, write_json

import muonkit
from muonkit.coefficients import as_preset
from muonkit.newton_schulz import orthogonalize_filled

LAYOUTS = {
    "per group": [(36, 768, 768), (12, 768, 768), (12, 768, 3072), (12, 768, 3072)],
    "merged": [(48, 768, 768), (24, 768, 3072)],
}
VARIANTS = [("newton_schulz", torch.bfloat16), ("gram", torch.float16), ("gram", torch.bfloat16)]


def _fill(X: torch.Tensor, src: torch.Tensor) -> None:
    X.copy_(src)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default="batch_merge.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    env = environment(device)
    rows = as_preset("jordan").schedule(5)
    results: list[dict[str, Any]] = []
    for method, dtype in VARIANTS:
        for layout, batches in LAYOUTS.items():
            inputs = []
            for b, m, n in batches:
                X = torch.randn(b, m, n, device=device)
                inputs.append((X / X.norm(dim=(-2, -1), keepdim=True)).to(dtype))

            def run(inputs: list[torch.Tensor] = inputs, dtype: torch.dtype = dtype, method: str = method) -> None:
                for src in inputs:
                    orthogonalize_filled(functools.partial(_fill, src=src),
                                         tuple(src.shape), rows, dtype, device, method)  # fmt: skip

            muonkit.accel.cuda_graphs.cache.clear()
            run()
            ms = time_ms(run, device, warmup=3, reps=args.reps)
            pipe = time_ms_pipelined(run, device, warmup=3, reps=args.reps)
            results.append({"method": method, "dtype": str(dtype), "layout": layout, "batches": batches,
                            "ms": ms, "ms_pipelined": pipe})  # fmt: skip
            print(f"{method:<14} {dtype!s:<15} {layout:<10} {ms:7.3f} ms  pipelined {pipe:7.3f} ms", flush=True)
    write_json(args.out, {"environment": env, "rows": results})


if __name__ == "__main__":
    main()
