"""Tile sizes and warps of the fused element-wise kernels (momentum pass, update pass) on GPT-2 small's matrices.

Per configuration: the momentum kernel over every matrix of each orientation (768 x 3072 written as is, 3072 x 768
written transposed into the NS input), replayed from a CUDA graph, in ms and GB/s (bytes it must move: fp32
gradient read, fp32 buffer read and written, bf16 NS input written), and the same for the update kernel (fp32
parameter read and written, bf16 NS output read). The default is ``muonkit.accel.fused``'s choice.

    python benchmarks/dev/elementwise_configs.py --out elementwise_configs.json
"""

from __future__ import annotations

import argparse
from typing import Any

import _parent  # noqa: F401  (benchmarks/ on sys.path)
import torch
import triton
from _common import environment, time_ms, write_json
from profile_step import graphed

from muonkit.accel import _fused_kernels as K
from muonkit.accel import fused

CONFIGS = [(32, 128, 4), (32, 128, 8), (64, 128, 8), (16, 256, 4), (32, 256, 8), (64, 64, 4), (64, 64, 8),
           (128, 64, 8), (64, 128, 4), (128, 128, 8)]  # fmt: skip


def measure(R: int, C: int, transposed: bool, b: int, config: tuple[int, int, int]) -> dict[str, Any]:
    """Both kernels over ``b`` fp32 ``R x C`` matrices with one tile configuration ``(BR, BC, warps)``."""
    dev = torch.device("cuda")
    br, bc, warps = config
    g, bufs, ps = ([torch.randn(R, C, device=dev) for _ in range(b)] for _ in range(3))
    O = torch.empty((b, C, R) if transposed else (b, R, C), dtype=torch.bfloat16, device=dev)
    out = O.mT if transposed else O
    S = torch.tensor([0.02, 1.0, 0.05, 0.95], device=dev)
    tiles_c = triton.cdiv(C, bc)
    T = triton.cdiv(R, br) * tiles_c
    partial = torch.empty((b, T), dtype=torch.float64, device=dev)
    strides = (out.stride(0), out.stride(1), out.stride(2))
    f32 = K.TL_DTYPE[torch.float32]

    def slots(tensors: list[torch.Tensor], row0: int) -> list[int]:
        a = [t.data_ptr() for t in tensors[row0 : row0 + 16]]
        return a + [a[0]] * (16 - len(a))

    def momentum() -> None:
        for row0 in range(0, b, 16):
            K.momentum_kernel[(T, min(16, b - row0))](
                *slots(g, row0), *slots(bufs, row0), partial, row0, out, *strides, R, C, tiles_c, T, 0.05, 0.95, S,
                NESTEROV=True, WRITE_U=True, FROM_S=True, G_T=f32, B_T=f32, BR=br, BC=bc, num_warps=warps,
            )  # fmt: skip

    def update() -> None:
        for row0 in range(0, b, 16):
            K.update_kernel[(T, min(16, b - row0))](
                *slots(ps, row0), row0, out, *strides, R, C, tiles_c, 0.02, 1.0, S, P_T=f32, U_T=f32, DECAY=False,
                FROM_S=True, BR=br, BC=bc, num_warps=warps,
            )  # fmt: skip

    rec: dict[str, Any] = {"shape": [R, C], "count": b, "transposed": transposed, "config": list(config)}
    n = R * C * b
    for name, fn, per in (("momentum", momentum, 14), ("update", update, 10)):
        try:
            ms = time_ms(graphed(fn), dev, reps=30)
            rec[f"{name}_ms"], rec[f"{name}_gbps"] = ms, per * n / ms / 1e6
        except Exception as err:  # a configuration that does not compile is reported
            rec[f"{name}_error"] = repr(err)[:200]
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=24, help="matrices per case")
    ap.add_argument("--out", default="elementwise_configs.json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    fused._build()
    rows = []
    for R, C, transposed in [(768, 3072, False), (3072, 768, True), (768, 768, False), (2304, 768, True)]:
        for config in CONFIGS:
            rec = measure(R, C, transposed, args.count, config)
            rows.append(rec)
            br, bc, warps = config
            print(f"{R}x{C}{' T' if transposed else '  '} {br:>3}x{bc:<3} w{warps}: momentum "
                  f"{rec.get('momentum_ms', float('nan')):.4f} ms {rec.get('momentum_gbps', 0):6.0f} GB/s   update "
                  f"{rec.get('update_ms', float('nan')):.4f} ms {rec.get('update_gbps', 0):6.0f} GB/s")  # fmt: skip
    write_json(args.out, {"environment": environment(dev), "rows": rows})


if __name__ == "__main__":
    main()
