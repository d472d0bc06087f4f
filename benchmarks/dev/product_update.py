"""Experiment: the last NS product and the parameter update in one kernel, against cuBLAS then the update pass.

A Muon step ends every batch with ``O = Z X`` (``Z``: the accumulated ``m x m`` polynomial, ``X``: the
``m x n`` NS input) and then a memory-bound pass ``p <- p * decay - scale * O`` over the fp32 parameters. Here one
Triton kernel computes a tile of ``Z X`` and applies it to the parameter tile in its epilogue (transposed
where the parameter is stored ``n x m``): the bf16 ``O`` never goes through memory, and the parameter
traffic of one tile overlaps the products of the others. Same arithmetic and roundings as
``muonkit.accel.fused.scaled_update`` on a bf16 ``O``. Times CUDA-graph replays (median) on the GPT-2-small
batches in their NS orientation, with half of each merged batch transposed as the step merges them.

    python benchmarks/dev/product_update.py --out benchmarks/dev/results/product_update_h100.json
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import _parent  # noqa: F401  (benchmarks/ on sys.path)
import torch
import triton
import triton.language as tl
from _common import environment, write_json

from muonkit.accel import fused
from muonkit.accel._fused_kernels import pick


@triton.jit
def product_update_kernel(
    p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15,
    Z, X, row0, M, N, tiles_n, szb, szm, szk, sxb, sxk, sxn, scale, decay,
    TRANSPOSED: tl.constexpr, P_T: tl.constexpr, U_T: tl.constexpr, DECAY: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, K_TILES: tl.constexpr,
):  # fmt: skip
    s = tl.program_id(1)
    i = (row0 + s).to(tl.int64)
    pid = tl.program_id(0)
    rm = (pid // tiles_n) * BM + tl.arange(0, BM)
    rn = (pid % tiles_n) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    z_ptr = Z + i * szb + rm[:, None] * szm + rk[None, :] * szk
    x_ptr = X + i * sxb + rk[:, None] * sxk + rn[None, :] * sxn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, K_TILES):
        acc += tl.dot(tl.load(z_ptr), tl.load(x_ptr))
        z_ptr += BK * szk
        x_ptr += BK * sxk
    o = acc.to(Z.dtype.element_ty)  # the NS output's rounding
    upd = (o.to(tl.float32) * scale).to(Z.dtype.element_ty).to(U_T).to(P_T).to(tl.float32)
    p_ptr = pick(s, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15).to(tl.pointer_type(P_T))
    if TRANSPOSED:  # the parameter is N x M: write the tile's transpose, row by row
        upd = tl.trans(upd)
        offs = rn[:, None].to(tl.int64) * M + rm[None, :]
    else:
        offs = rm[:, None].to(tl.int64) * N + rn[None, :]
    p = tl.load(p_ptr + offs)
    if DECAY:
        p = (p.to(tl.float32) * decay).to(P_T)
    tl.store(p_ptr + offs, (p.to(tl.float32) - upd).to(P_T))


def product_update(params: fused.Matrices, Z: torch.Tensor, X: torch.Tensor, scale: float, decay: float,
                   cfg: tuple[int, int, int, int, int]) -> None:  # fmt: skip
    bm, bn, bk, warps, stages = cfg
    b, m, n = X.shape
    transposed = params.rows != m
    tiles_n = triton.cdiv(n, bn)
    addresses = params.addresses()
    for row0 in range(0, b, fused.SLOTS):
        group = addresses[row0 : row0 + fused.SLOTS]
        args = group + [group[0]] * (fused.SLOTS - len(group))
        product_update_kernel[(triton.cdiv(m, bm) * tiles_n, len(group))](
            *args, Z, X, row0, m, n, tiles_n, *Z.stride(), *X.stride(), scale, decay,
            TRANSPOSED=transposed, P_T=tl.float32, U_T=tl.float32, DECAY=decay != 1.0, BM=bm, BN=bn, BK=bk,
            K_TILES=m // bk,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip


def measure(case: tuple[int, int, int, int], configs: list, scale: float, decay: float,
            dev: torch.device) -> tuple[list[dict[str, Any]], float, float]:  # fmt: skip
    """One batch: the baseline, then every configuration of the fused kernel; (rows, baseline ms, best fused ms)."""
    b, m, n, n_t = case
    rows: list[dict[str, Any]] = []
    torch.manual_seed(0)
    Z = torch.randn(b, m, m, device=dev).div_(m**0.5)
    Z = (Z + Z.mT).bfloat16()
    X = (torch.randn(b, m, n, device=dev) / n**0.5).bfloat16()
    plain = [torch.randn(m, n, device=dev) for _ in range(b - n_t)]
    trans = [torch.randn(n, m, device=dev) for _ in range(n_t)]
    runs = []  # (Matrices, slice of the batch) per orientation
    if plain:
        runs.append((fused.Matrices(plain, list(range(len(plain))), [0] * len(plain), m, n), slice(0, b - n_t)))
    if trans:
        runs.append((fused.Matrices(trans, list(range(n_t)), [0] * n_t, n, m), slice(b - n_t, b)))
    saved = [t.clone() for t in plain + trans]

    def restore() -> None:
        for t, s in zip(plain + trans, saved):
            t.copy_(s)

    def baseline() -> None:
        O = torch.bmm(Z, X)
        for mats, sl in runs:
            o = O[sl] if mats.rows == m else O[sl].mT
            fused.scaled_update(mats, o, scale=scale, decay=decay, update_dtype=torch.float32)

    restore()
    baseline()
    expected = [t.clone() for t in plain + trans]
    t_base = bench(baseline)
    restore()
    base = {"b": b, "m": m, "n": n, "transposed": n_t}
    rows.append({**base, "impl": "cuBLAS bmm + update kernel", "ms": t_base})
    print(f"{b}x{m}x{n} ({n_t} transposed): cuBLAS + update {t_base:.4f} ms")
    best = None
    for cfg in configs:
        name = "fused bm{} bn{} bk{} w{} s{}".format(*cfg)

        def run(cfg: tuple = cfg) -> None:
            for mats, sl in runs:
                product_update(mats, Z[sl], X[sl], scale, decay, cfg)

        try:
            restore()
            run()
            err = max(float((t - e).abs().max() / scale) for t, e in zip(plain + trans, expected))
            t = bench(run)
        except Exception as e:  # a configuration that does not compile or fit is reported, the rest run
            rows.append({**base, "impl": name, "error": repr(e)[:300]})
            print(f"  {name}: FAILED {repr(e)[:160]}")
            continue
        rows.append({**base, "impl": name, "ms": t, "max_diff_in_updates": err})
        print(f"  {name}: {t:.4f} ms ({t_base / t:.2f}x), max |diff| / lr {err:.2e}")
        best = t if best is None else min(best, t)
    return rows, t_base, float("nan") if best is None else best


def bench(fn: Any) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    env = environment(dev)
    print(f"{env['gpu']}, torch {env['torch']}, triton {triton.__version__}")
    # (batch, m, n, transposed matrices among them): the GPT-2-small no-split batches as the step merges them
    cases = [(24, 768, 3072, 12), (12, 768, 2304, 12), (12, 768, 768, 0)]
    configs = [*itertools.product((128,), (128, 256), (64,), (4, 8), (3, 4)), (64, 256, 64, 4, 3)]
    rows: list[dict[str, Any]] = []
    scale, decay = 0.02, 1 - 0.02 * 0.01
    total_base = total_best = 0.0
    for case in cases:
        case_rows, t_base, best = measure(case, configs, scale, decay, dev)
        rows += case_rows
        total_base += t_base
        total_best += best
    print(f"\nall three batches: cuBLAS + update {total_base:.4f} ms, best fused {total_best:.4f} ms")
    if args.out:
        write_json(args.out, {"environment": env, "rows": rows, "total_baseline_ms": total_base,
                              "total_best_fused_ms": total_best})  # fmt: skip


if __name__ == "__main__":
    main()
