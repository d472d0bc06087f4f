"""Where the host (Python) time of one eager muonkit step goes, with the steps queued behind a GPU sleep so that
the host never waits for the GPU: the plain host time per step, then cProfile over more steps (which inflates
it) with the functions that take it.

python benchmarks/dev/host_profile.py [--set gpt2-small] [--method gram --fp16] [--nosplit] [--out host.json]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import _parent  # noqa: F401  (benchmarks/ on sys.path)
import torch
from _common import environment, write_json
from step import SETS, add_set_arguments, make_params, split_groups

import muonkit


def host_ms(step: object, reps: int) -> float:
    """Host milliseconds per ``step()`` while the GPU is kept busy (a sleep queued first)."""
    torch.cuda.synchronize()
    torch.cuda._sleep(4_000_000_000)  # the GPU stays busy: the host never waits below
    t0 = time.perf_counter()
    for _ in range(reps):
        step()  # type: ignore[operator]
    elapsed = (time.perf_counter() - t0) / reps * 1e3
    torch.cuda.synchronize()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_set_arguments(ap)
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    layers, shapes = SETS[args.set]
    params = make_params(layers, shapes, torch.device("cuda"))
    opt = muonkit.Muon(params if args.nosplit else split_groups(params), nonfinite="ignore", method=args.method,
                       ns_dtype=torch.float16 if args.fp16 else None)  # fmt: skip
    for _ in range(3):
        opt.step()
    plain = min(host_ms(opt.step, args.reps) for _ in range(3))
    prof = cProfile.Profile()
    prof.enable()
    profiled = host_ms(opt.step, args.reps)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    print(out.getvalue()[-6000:])
    print(f"host time per step: {plain:.3f} ms (best of 3 runs of {args.reps}); under cProfile {profiled:.2f} ms")
    if args.out:
        write_json(args.out, {"environment": environment(torch.device("cuda")), "set": args.set,
                              "method": args.method, "fp16": args.fp16, "nosplit": args.nosplit,
                              "host_ms": plain, "host_ms_cprofile": profiled})  # fmt: skip


if __name__ == "__main__":
    main()
