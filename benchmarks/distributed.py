"""Distributed Muon step: time and bytes per step vs world size, sharded NS work vs every rank doing all of it.

Run with torchrun (gloo on CPU, nccl on GPUs); rank 0 prints a table and writes JSON:

    torchrun --nproc-per-node 2 benchmarks/distributed.py --set small-cpu --out dist_cpu_2.json
    torchrun --nproc-per-node 4 benchmarks/distributed.py --set gpt2-small --out dist_gpu_4.json   # GPUs

Replicated parameters with identical gradients on every rank (what DDP produces after its all-reduce);
the gradient all-reduce itself is not timed, only the optimizer step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from _common import environment, write_json

import muonkit
from muonkit.distributed import ReplicatedExecutor

SETS = {
    "small-cpu": (4, [(384, 128), (128, 128), (512, 128), (128, 512)]),
    "gpt2-small": (12, [(2304, 768), (768, 768), (3072, 768), (768, 3072)]),
    "1b": (16, [(6144, 2048), (2048, 2048), (8192, 2048), (2048, 8192)]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="small-cpu", choices=list(SETS))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default="distributed.json")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    layers, shapes = SETS[args.set]
    gen = torch.Generator().manual_seed(0)  # the same parameters and gradients on every rank
    params = []
    for _ in range(layers):
        for shape in shapes:
            p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device))
            p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device)
            params.append(p)
    rows = []
    for mode in ("every rank, all matrices", "sharded (ReplicatedExecutor)"):
        executor = ReplicatedExecutor() if mode.startswith("sharded") else None
        opt = muonkit.Muon(params, nonfinite="ignore", executor=executor)
        opt.step()
        times = []
        for _ in range(args.reps):
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            if cuda:
                torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - t0))
        sent = executor.bytes_communicated / (args.reps + 1) if executor else 0
        rows.append({"mode": mode, "world_size": world, "ms": statistics.median(times), "bytes_per_step": sent})
    if rank == 0:
        print(f"set {args.set}, {world} rank(s), {'nccl' if cuda else 'gloo'}")
        print(f"{'mode':<30} {'ms/step':>9} {'MB sent/step':>13}")
        for r in rows:
            print(f"{r['mode']:<30} {r['ms']:>9.2f} {r['bytes_per_step'] / 2**20:>13.2f}")
        write_json(args.out, {"environment": environment(device), "set": args.set, "rows": rows})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
