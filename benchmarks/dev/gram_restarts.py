"""Gram NS restart placements: accuracy in half precision and time, against plain NS, in one run.

A restart (``restarts=(k,)``) re-forms ``X = Q X`` and recomputes ``R = X X^T`` before step ``k``, which bounds
the drift of ``R`` accumulated in half precision, at the cost of two products with the ``m x n`` input. Without
restarts Gram NS does three more ``m x m`` products (the R and Q updates of the steps around the restart) and
two fewer ``m x n`` ones. This program measures what each placement costs in accuracy (relative Frobenius
error of ``orthogonalize`` against the same polynomials in float64, so the arithmetic alone) on inputs of
several spectra and coefficient sets, and in time (``orthogonalize`` on the GPT-2-small Gram batches, CUDA
graphs as the step uses them).

    python benchmarks/dev/gram_restarts.py --out benchmarks/dev/results/gram_restarts_h100.json
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import _parent  # noqa: F401  (benchmarks/ on sys.path)
import torch
from _common import environment, time_ms_pipelined, write_json

import muonkit

PLACEMENTS: list[tuple[int, ...]] = [(2,), (), (1,), (3,), (1, 3)]
SPECTRA = ("gaussian", "log-spread", "low-rank")


def make_input(spectrum: str, batch: int, m: int, n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """float64 test matrices: ``gaussian`` (i.i.d. entries), ``log-spread`` (singular values log-uniform over
    [1e-4, 1]), ``low-rank`` (rank 16 plus 1e-3 relative Gaussian noise, as a gradient of a few examples)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    G = torch.randn(batch, m, n, generator=gen, dtype=torch.float64)
    if spectrum == "log-spread":
        k = min(m, n)
        U, _ = torch.linalg.qr(torch.randn(batch, m, k, generator=gen, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(batch, n, k, generator=gen, dtype=torch.float64))
        G = (U * torch.logspace(-4, 0, k, dtype=torch.float64)) @ V.mT
    elif spectrum == "low-rank":
        A = torch.randn(batch, m, 16, generator=gen, dtype=torch.float64)
        B = torch.randn(batch, 16, n, generator=gen, dtype=torch.float64)
        L = A @ B
        G = L + 1e-3 * G * (L.norm() / G.norm())
    elif spectrum != "gaussian":
        raise ValueError(f"unknown spectrum {spectrum!r}; choose from {SPECTRA}")
    return G.to(device)


def relative_error(G: torch.Tensor, coefficients: str, dtype: torch.dtype, method: str,
                   restarts: tuple[int, ...]) -> float:  # fmt: skip
    ref = muonkit.orthogonalize(G, coefficients, steps=5, dtype=torch.float64)
    out = muonkit.orthogonalize(G.float(), coefficients, steps=5, dtype=dtype, method=method, restarts=restarts)
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return float((out.double() - ref).norm() / ref.norm())


def label(method: str, restarts: tuple[int, ...]) -> str:
    return "plain" if method == "newton_schulz" else f"gram restarts={list(restarts)}"


def variants() -> list[tuple[str, tuple[int, ...]]]:
    return [("newton_schulz", ())] + [("gram", r) for r in PLACEMENTS]


def all_placements(steps: int) -> list[tuple[int, ...]]:
    """No restart, every single one and every pair."""
    singles = [(k,) for k in range(1, steps)]
    return [(), *singles] + [(a, b) for a in range(1, steps) for b in range(a + 1, steps)]


def default_and_dao(steps: int) -> list[tuple[int, ...]]:
    """muonkit's default for this step count and Dao-AILab's (2,)."""
    from muonkit.newton_schulz import gram_restarts

    return [gram_restarts(steps), (2,)]


def sweep(device: torch.device, shape: tuple[int, int, int], dtype: torch.dtype, steps_range: range = range(3, 9),
          placements_of: Any = all_placements) -> list[dict[str, Any]]:  # fmt: skip
    """Restart placements (``--sweep``: none, one or two, 3 to 8 steps; ``--check-default``: the default and (2,),
    3 to 12 steps): per input (both coefficient sets, every spectrum) the relative error against float64
    divided by plain NS's in the same precision; a placement's score is its worst ratio (1: as accurate as
    plain NS on every input)."""
    out: list[dict[str, Any]] = []
    inputs = {s: make_input(s, *shape, device) for s in SPECTRA}
    for steps in steps_range:
        cases = [(c, s) for c in ("jordan", "polar_express") for s in SPECTRA]
        refs = {(c, s): muonkit.orthogonalize(inputs[s], c, steps=steps, dtype=torch.float64) for c, s in cases}

        def errors(method: str, restarts: tuple[int, ...], steps: int = steps, refs: dict = refs) -> list[float]:
            errs = []
            for (c, s), ref in refs.items():
                o = muonkit.orthogonalize(inputs[s].float(), c, steps=steps, dtype=dtype, method=method,
                                          restarts=restarts).double()  # fmt: skip
                errs.append(float((o - ref).norm() / ref.norm()) if bool(torch.isfinite(o).all()) else float("inf"))
            return errs

        placements = placements_of(steps)
        plain = errors("newton_schulz", ())
        ratios = {str(list(r)): max(e / p for e, p in zip(errors("gram", r), plain)) for r in placements}
        ranked = sorted(ratios.items(), key=lambda kv: kv[1])
        out.append({"steps": steps, "cases": [list(k) for k in cases], "plain_errors": plain,
                    "worst_ratio_to_plain": ratios})  # fmt: skip
        print(f"steps {steps}: " + ", ".join(f"{k} {v:.2f}" for k, v in ranked[:8]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="small shapes and few repetitions (CPU smoke run)")
    ap.add_argument("--sweep", action="store_true", help="only the placement sweep over 3-8 steps (worst error)")
    ap.add_argument("--check-default", action="store_true", help="the default placement and (2,), 3-12 steps")
    ap.add_argument("--shape", default=None, help="sweep shape b,m,n (default 4,768,3072; --small 2,128,512)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.sweep or args.check_default:
        shape = (2, 128, 512) if args.small else (4, 768, 3072)
        if args.shape:
            b, m, n = (int(v) for v in args.shape.split(","))
            shape = (b, m, n)
        dtype = torch.bfloat16
        result = (sweep(device, shape, dtype, range(3, 13), default_and_dao) if args.check_default
                  else sweep(device, shape, dtype))  # fmt: skip
        if args.out:
            write_json(args.out, {"environment": environment(device), "sweep": result, "shape": list(shape),
                                  "dtype": str(dtype)})  # fmt: skip
        return
    half = device.type == "cuda"
    acc_shape = (2, 64, 256) if args.small else (4, 768, 3072)
    dtypes = [torch.bfloat16, torch.float16] if half or not args.small else [torch.bfloat16]
    accuracy: list[dict[str, Any]] = []
    print(f"accuracy: relative error vs float64, {acc_shape[0]} x {acc_shape[1]} x {acc_shape[2]}")
    print(f"{'coefficients':14s} {'spectrum':11s} {'dtype':9s} " + " ".join(f"{label(*v):>22s}" for v in variants()))
    for coefficients in ("jordan", "polar_express"):
        for spectrum in SPECTRA:
            G = make_input(spectrum, *acc_shape, device)
            for dtype in dtypes:
                errs = {label(*v): relative_error(G, coefficients, dtype, *v) for v in variants()}
                accuracy.append({"coefficients": coefficients, "spectrum": spectrum, "dtype": str(dtype),
                                 "shape": list(acc_shape), "errors": errs})  # fmt: skip
                row = " ".join(f"{e:22.3e}" for e in errs.values())
                print(f"{coefficients:14s} {spectrum:11s} {str(dtype)[6:]:9s} {row}")
    timing: list[dict[str, Any]] = []
    shapes = [(2, 64, 256)] if args.small else [(24, 768, 3072), (12, 768, 2304), (8, 1024, 4096), (4, 4096, 14336)]
    reps = 3 if args.small else 50
    print("\ntime: ms per orthogonalize call (bf16, jordan, back to back)")
    print(f"{'shape':18s} " + " ".join(f"{label(*v):>22s}" for v in variants()))
    for b, m, n in shapes:
        X = torch.randn(b, m, n, device=device) / n**0.5
        dtype = torch.bfloat16 if half else torch.float32
        ms = {}
        for method, restarts in variants():
            call = functools.partial(muonkit.orthogonalize, X, "jordan", steps=5, dtype=dtype, method=method,
                                     restarts=restarts)  # fmt: skip
            ms[label(method, restarts)] = time_ms_pipelined(call, device, warmup=5, reps=reps)
        timing.append({"shape": [b, m, n], "dtype": str(dtype), "ms": ms})
        print(f"{f'{b}x{m}x{n}':18s} " + " ".join(f"{t:22.4f}" for t in ms.values()))
    if args.out:
        write_json(args.out, {"environment": environment(device), "accuracy": accuracy, "timing": timing})


if __name__ == "__main__":
    main()
