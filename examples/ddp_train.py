"""Data-parallel training with muonkit: each rank orthogonalizes a share of the matrices.

Run on CPU with two processes (gloo) or on GPUs (nccl):

    torchrun --nproc-per-node 2 examples/ddp_train.py
    torchrun --nproc-per-node 4 examples/ddp_train.py --device cuda

DDP averages the gradients; ``ReplicatedExecutor`` then gives every rank a FLOP-balanced share of the
batched Newton-Schulz work and all-reduces the results, so all ranks keep identical weights, equal to a
single-process run.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import muonkit
from muonkit.distributed import ReplicatedExecutor
from muonkit.train import SIZES, GPT, builtin_corpus
from muonkit.train.corpus import sample_batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # same initial weights on every rank
    model = GPT(SIZES["tiny"]).to(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None)
    groups = muonkit.param_groups(model, split={"*.qkv.weight": 3})
    opt = muonkit.Muon(groups, lr=0.02, adamw_lr=1e-3, executor=ReplicatedExecutor())

    corpus = builtin_corpus()
    gen = torch.Generator().manual_seed(1 + rank)  # each rank draws its own batches
    for step in range(1, args.steps + 1):
        x, y = (t.to(device) for t in sample_batch(corpus.train, 8, SIZES["tiny"].ctx, gen))
        loss = ddp(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rank == 0 and step % 10 == 0:
            print(f"step {step}: loss {loss.item():.3f}")
    if rank == 0:
        print(f"{world} ranks; bytes all-reduced per rank: {opt.executor.bytes_communicated:,}")
    dist.barrier()  # let every rank finish its last collective before tearing the group down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
