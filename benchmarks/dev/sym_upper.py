"""Upper-tile storage for Gram NS's ``m x m`` products: whole matrices against upper tiles only, same run.

A product of two symmetric matrices on the symmetric-product kernel computes the tiles on and above the
diagonal; stored whole, it also writes each off-diagonal tile's mirror, and its consumers read whole
matrices. Stored in upper tiles only (``kernels.sym_product(upper_in=..., upper_out=...)``), the mirror
writes go and the consumers read each stored tile for both its own place and its mirror's (transposed
in the loads), half the bytes. This times, inside CUDA graphs (median of replays):

- each product kind of the chain (``R R`` polynomial, ``P W``, ``X X^T``) whole against upper;
- plain and Gram NS over the GPT-2-small and 1B batches (Jordan's coefficients, 5 steps, default restarts),
  with ``kernels.UPPER`` off and on, and checks that the two give the same bits;
- for scale, the GPU's L2-to-SM read rate: a kernel rereading a 24 MB buffer (an L2-resident set, as a
  24 x 768^2 bf16 operand is) past L1 (``.cg`` loads), and the same over a 1 GB buffer (HBM).

    python benchmarks/dev/sym_upper.py --out benchmarks/dev/results/sym_upper_h100.json     # needs CUDA
"""

from __future__ import annotations

import argparse
from typing import Any

import _parent  # noqa: F401  (benchmarks/ on sys.path)
import torch
import triton
from _common import environment, write_json
from kernel_configs import graph_time_ms

from muonkit import newton_schulz
from muonkit.accel import kernels
from muonkit.coefficients import as_preset

BATCHES = [(24, 768, 3072), (12, 768, 2304), (12, 768, 768), (48, 768, 768), (64, 2048, 8192), (32, 2048, 2048)]


def graph_ms(fn: Any, reps: int) -> float:
    """``kernel_configs.graph_time_ms`` after a first call that times tile sizes as before a capture."""
    with kernels.capture_warmup():
        fn()
    return graph_time_ms(fn, reps)


def read_rate(mbytes: int, reps: int) -> float:
    """TB/s of a kernel whose programs each read 8 KB blocks of a ``mbytes`` MB bf16 buffer, strided over it,
    bypassing L1; about 1.7 GB read per launch."""
    import triton.language as tl

    @triton.jit
    def reread(X, Out, NB, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        progs = tl.num_programs(0)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(ITERS):
            blk = ((pid + i * progs) % NB).to(tl.int64)
            acc += tl.load(X + blk * BLOCK + tl.arange(0, BLOCK), cache_modifier=".cg").to(tl.float32)
        tl.store(Out + pid * BLOCK + tl.arange(0, BLOCK), acc)

    block, iters = 4096, 200
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    progs = 8 * sms
    X = torch.ones(mbytes * 2**20 // 2, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(progs * block, device="cuda")
    nb = X.numel() // block

    def fn() -> None:
        reread[(progs,)](X, out, nb, ITERS=iters, BLOCK=block, num_warps=8)

    ms = graph_ms(fn, reps)
    return progs * iters * block * 2 / (ms * 1e-3) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default=None, help="e.g. 24x768x3072,12x768x2304")
    ap.add_argument("--reps", type=int, default=200, help="ms of replays per timing")
    ap.add_argument("--out", default="sym_upper.json")
    ap.add_argument("--rates-only", action="store_true", help="only the L2 / HBM read rates")
    args = ap.parse_args()
    device = torch.device("cuda")
    batches = [tuple(map(int, s.split("x"))) for s in args.batches.split(",")] if args.batches else BATCHES
    rows = as_preset("jordan").schedule(5)
    restarts = newton_schulz.gram_restarts(len(rows))
    a, b_, c = rows[0]
    kernels.set_mode("auto")
    gen = torch.Generator(device=device).manual_seed(0)
    products: list[dict[str, Any]] = []
    chains: list[dict[str, Any]] = []
    for b, m, n in [] if args.rates_only else batches:
        X = torch.randn(b, m, n, device=device, generator=gen).bfloat16()
        d = X.float().norm(dim=(1, 2)) + 1e-7
        R = kernels.sym_product(X, divisor=d, power=2)  # whole, exactly symmetric
        P = kernels.sym_product(R, alpha=c, beta=b_, Y=R, diag=a)
        cases = {
            "xxt": (X, {"divisor": d, "power": 2}, False),
            "poly": (R, {"alpha": c, "beta": b_, "Y": R, "diag": a}, True),
            "gram": (P, {"W": R}, True),
        }
        for name, (inp, kw, square) in cases.items():

            def fn(up: bool, inp: torch.Tensor = inp, kw: dict = kw, square: bool = square) -> torch.Tensor:
                return kernels.sym_product(inp, **kw, upper_in=up and square, upper_out=up)

            whole_ms = graph_ms(lambda fn=fn: fn(False), args.reps)
            upper_ms = graph_ms(lambda fn=fn: fn(True), args.reps)
            same = bool(torch.equal(torch.triu(fn(False)), torch.triu(fn(True))))
            products.append({"batch": [b, m, n], "product": name, "whole_ms": whole_ms, "upper_ms": upper_ms,
                             "upper_triangle_bitwise_equal": same})  # fmt: skip
            print(f"{b}x{m}x{n} {name:>4}: whole {whole_ms:.4f} ms, upper {upper_ms:.4f} ms "
                  f"({whole_ms / upper_ms:.2f}x), upper triangle equal: {same}", flush=True)  # fmt: skip
        for method in ("newton_schulz", "gram"):

            def run(method: str = method, X: torch.Tensor = X, d: torch.Tensor = d) -> torch.Tensor:
                if method == "gram":
                    return newton_schulz.iteration._gram_newton_schulz(X, rows, restarts, d)
                return newton_schulz.iteration._newton_schulz(X, rows, d)

            out: dict[bool, torch.Tensor] = {}
            ms: dict[bool, float] = {}
            for up in (False, True):
                kernels.UPPER = up
                ms[up] = graph_ms(run, args.reps)
                out[up] = run()
            kernels.UPPER = True
            same = bool(torch.equal(out[False], out[True]))
            diff = float((out[False].float() - out[True].float()).abs().max())
            chains.append({"batch": [b, m, n], "method": method, "whole_ms": ms[False], "upper_ms": ms[True],
                           "bitwise_equal": same, "max_abs_diff": diff})  # fmt: skip
            print(f"{b}x{m}x{n} {method:>13}: whole {ms[False]:.4f} ms, upper {ms[True]:.4f} ms "
                  f"({ms[False] / ms[True]:.2f}x), bitwise equal: {same} (max |diff| {diff:.1e})")  # fmt: skip
    rates = {f"{mb}MB": read_rate(mb, args.reps) for mb in (24, 1024)}
    print("read rate, TB/s: " + ", ".join(f"{k} buffer {v:.2f}" for k, v in rates.items()))
    write_json(args.out, {"environment": environment(device), "restarts": list(restarts),
                          "products": products, "chains": chains, "read_tb_per_s": rates})  # fmt: skip


if __name__ == "__main__":
    main()
