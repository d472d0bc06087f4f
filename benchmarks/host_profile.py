"""Where the host (Python) time of one eager muonkit step goes: cProfile over steps queued behind a GPU sleep.

python benchmarks/host_profile.py [--set gpt2-small] [--method gram --fp16]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
from step import SETS, make_params, split_groups

import muonkit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="gpt2-small", choices=sorted(SETS))
    ap.add_argument("--method", default="newton_schulz")
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    layers, shapes = SETS[args.set]
    params = make_params(layers, shapes, torch.device("cuda"))
    opt = muonkit.Muon(split_groups(params), nonfinite="ignore", method=args.method,
                       ns_dtype=torch.float16 if args.fp16 else None)  # fmt: skip
    for _ in range(3):
        opt.step()
    torch.cuda.synchronize()
    torch.cuda._sleep(4_000_000_000)  # the GPU stays busy: the host never waits below
    t0 = time.perf_counter()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.reps):
        opt.step()
    prof.disable()
    host = (time.perf_counter() - t0) / args.reps * 1e3
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    print(out.getvalue()[-6000:])
    print(f"host time per step under cProfile: {host:.2f} ms")


if __name__ == "__main__":
    main()
