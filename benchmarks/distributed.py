"""Distributed Muon step: time, bytes and state per rank vs world size, for each way of spreading the NS work.

Run with torchrun (gloo on CPU, nccl on GPUs); rank 0 prints a table and writes JSON:

    torchrun --nproc-per-node 2 benchmarks/distributed.py --set small-cpu --out dist_cpu_2.json
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
        torchrun --nproc-per-node 4 benchmarks/distributed.py --set gpt2-small --out dist_gpu_4.json

Modes, all from the same parameters and gradients (the gradients every rank holds after DDP's all-reduce,
or their Shard(0) pieces for FSDP2; gradient communication itself is not timed, only ``opt.step()``):

* ``naive``: every rank orthogonalizes every matrix (what a plain optimizer under DDP does);
* ``ddp-all_gather`` / ``ddp-all_reduce``: ``ReplicatedExecutor`` with each exchange, one per shape as soon
  as it is computed; ``ddp-all_gather-once``: one all-gather at the end (``overlap=False``); ``ddp-zero1``:
  momentum rows sharded across ranks (``shard_state=True``);
* ``fsdp2`` / ``fsdp2-bf16``: DTensor ``Shard(0)`` parameters (as ``fully_shard`` makes them); updates travel
  to their owners in fp32 / bf16, results come back in the NS dtype;
* ``tp``: tensor-parallel DTensors, ``Shard(0)`` (column-wise) and ``Shard(1)`` (row-wise) alternating; each
  matrix is assembled on its owner from every rank's block as under FSDP2.

``step peak MB`` (CUDA only) is what a step allocates at its peak beyond the memory that stays allocated between
steps (parameters, gradients, optimizer state, cached graphs): the exchange's staging buffers and NS workspaces.
``max_rel_diff`` compares each mode's weights after all its steps with the naive mode's (= a single-device
run): 0 up to rounding for the exact modes.
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
MODES = ("naive", "ddp-all_gather", "ddp-all_gather-once", "ddp-all_reduce", "ddp-zero1", "fsdp2", "fsdp2-bf16", "tp")


def _make(mode, base, grads, device):
    """Parameters (with gradients) and the optimizer for one mode."""
    if mode.startswith("fsdp2") or mode == "tp":
        from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        params = []
        for i, (b, g) in enumerate(zip(base, grads)):
            # tp: as parallelize_module leaves a block: column-wise Shard(0) and row-wise Shard(1) weights alternate
            place = [Shard(i % 2 if mode == "tp" else 0)]
            p = torch.nn.Parameter(distribute_tensor(b.clone(), mesh, place))
            p.grad = distribute_tensor(g, mesh, place)
            params.append(p)
        comm = torch.bfloat16 if mode == "fsdp2-bf16" else None
        return params, muonkit.Muon(params, nonfinite="ignore", comm_dtype=comm)
    params = []
    for b, g in zip(base, grads):
        p = torch.nn.Parameter(b.clone())
        p.grad = g
        params.append(p)
    executor = None
    if mode == "ddp-zero1":
        executor = ReplicatedExecutor(shard_state=True)
    elif mode != "naive":
        executor = ReplicatedExecutor(exchange=mode.split("-")[1], overlap=not mode.endswith("-once"))
    return params, muonkit.Muon(params, nonfinite="ignore", executor=executor)


def _full(p):
    return p.full_tensor() if hasattr(p, "full_tensor") else p.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="small-cpu", choices=list(SETS))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", default="distributed.json")
    ap.add_argument("--profile", action="store_true", help="rank 0 prints a torch.profiler table of one step per mode")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    layers, shapes = SETS[args.set]
    gen = torch.Generator().manual_seed(0)  # the same parameters and gradients on every rank
    base, grads = [], []
    for _ in range(layers):
        for shape in shapes:
            base.append((torch.randn(shape, generator=gen) * 0.02).to(device))
            grads.append((torch.randn(shape, generator=gen) * 1e-3).to(device))
    rows, reference = [], None
    for mode in args.modes.split(","):
        params, opt = _make(mode, base, grads, device)
        opt.step()
        if cuda:  # what a step allocates beyond what stays between steps (parameters, gradients, state, caches)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
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
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=acts) as prof:
                opt.step()
                if cuda:
                    torch.cuda.synchronize()
            if rank == 0:
                key = "cuda_time_total" if cuda else "cpu_time_total"
                print(f"--- profile: {mode}")
                print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=40))
        peak = torch.cuda.max_memory_allocated(device) - resident if cuda else None
        final = [_full(p) for p in params]
        if reference is None:
            reference = final
        diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(final, reference))
        state = sum(muonkit.distributed.local(s["momentum_buffer"]).numel() * 4 for s in opt.state.values())
        rows.append(
            {
                "mode": mode,
                "world_size": world,
                "ms": statistics.median(times),
                "ms_min": min(times),
                "bytes_per_step": opt.bytes_communicated / (args.reps + 1),
                "state_bytes_per_rank": state,
                "step_peak_extra_bytes": peak,
                "max_rel_diff_vs_first_mode": diff,
            }
        )
        del params, opt
    if rank == 0:
        print(f"set {args.set}, {world} rank(s), {'nccl' if cuda else 'gloo'}; reference for diffs: {rows[0]['mode']}")
        print(
            f"{'mode':<20} {'ms/step':>9} {'MB sent/step':>13} {'state MB/rank':>14} {'step peak MB':>13} "
            f"{'max rel diff':>13}"
        )
        for r in rows:
            peak = "n/a" if r["step_peak_extra_bytes"] is None else f"{r['step_peak_extra_bytes'] / 2**20:.1f}"
            print(
                f"{r['mode']:<20} {r['ms']:>9.2f} {r['bytes_per_step'] / 2**20:>13.2f} "
                f"{r['state_bytes_per_rank'] / 2**20:>14.1f} {peak:>13} {r['max_rel_diff_vs_first_mode']:>13.2e}"
            )
        write_json(args.out, {"environment": environment(device), "set": args.set, "rows": rows})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
