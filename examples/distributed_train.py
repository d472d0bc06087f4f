"""Distributed training with muonkit under torchrun: DDP, FSDP2, tensor parallel or both, Muon or AdamW.

CPU, two processes (gloo):      torchrun --nproc-per-node 2 examples/distributed_train.py
GPUs (nccl), FSDP2:             torchrun --nproc-per-node 4 examples/distributed_train.py --device cuda \\
                                    --mode fsdp2 --size medium --steps 500 --out fsdp2_muon.json
Tensor parallel over 2, FSDP2 over the rest:  torchrun --nproc-per-node 4 examples/distributed_train.py --mode tp_fsdp2

* ``--mode ddp``: ``DistributedDataParallel`` averages the gradients; ``ReplicatedExecutor`` gives every
  rank a FLOP-balanced share of the batched Newton-Schulz work and all-gathers the results.
* ``--mode fsdp2``: ``fully_shard`` on every transformer block and the root; parameters, gradients and
  the optimizer state are DTensors sharded on dim 0. ``Muon`` sees that by itself: each matrix is
  assembled on one owner rank, orthogonalized there, and its rows sent back (two all-to-alls).
* ``--mode tp``: every rank one tensor-parallel rank (``parallelize_module``: column-wise ``qkv`` and ``fc``,
  row-wise ``proj`` and ``fc_proj``, so weights are ``Shard(0)`` or ``Shard(1)`` DTensors); all ranks see the
  same batches. ``--mode tp_fsdp2``: tensor parallel over ``--tp`` ranks and FSDP2 over the others (a 2-D mesh).
  ``Muon`` assembles each matrix from its blocks the same way, so the update is one process's.

Either way every rank draws its own batches (global batch = ``--batch`` x ranks), rank 0 prints the
loss and, with ``--out``, writes the train/val loss curve as JSON. Checkpoints: DDP state is replicated,
so rank 0 can ``torch.save`` it; for FSDP2 use ``torch.distributed.checkpoint`` with
``get_state_dict(model, opt)`` (see tests/test_fsdp.py), which also loads into a different world size.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from torch import nn

import muonkit
from muonkit.distributed import ReplicatedExecutor
from muonkit.train import GPT, SIZES, builtin_corpus
from muonkit.train.corpus import sample_batch
from muonkit.train.optimizers import resolve_lrs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl)")
    ap.add_argument("--mode", default="ddp", choices=["ddp", "fsdp2", "tp", "tp_fsdp2"])
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks of --mode tp_fsdp2")
    ap.add_argument("--optimizer", default="muon", choices=["muon", "adamw"])
    ap.add_argument("--size", default="tiny", choices=list(SIZES))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--out", default=None, help="write the loss curve here (JSON, rank 0)")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)

    cfg = SIZES[args.size]
    torch.manual_seed(0)  # the same initial weights on every rank
    model = GPT(cfg).to(device)
    data_rank, data_ranks = rank, world  # which batches this rank draws, and how many ranks draw their own
    forward: nn.Module = model
    if args.mode == "ddp":
        forward = nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None)
    elif args.mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    else:
        data_rank, data_ranks = _tensor_parallel(model, args, world, device.type)
    lrs = resolve_lrs(f"lm-{args.size}")
    if args.optimizer == "muon":
        groups = muonkit.param_groups(model, split={"*.qkv.weight": 3})  # after fully_shard: DTensor params
        executor = ReplicatedExecutor() if args.mode == "ddp" else None
        opt: torch.optim.Optimizer = muonkit.Muon(groups, lr=lrs["muon"], adamw_lr=lrs["adamw"], executor=executor)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lrs["adamw"], betas=(0.9, 0.95), weight_decay=0.0)

    corpus = builtin_corpus()
    gen = torch.Generator().manual_seed(1 + data_rank)  # each data-parallel rank draws its own batches
    val_gen = torch.Generator().manual_seed(12345)  # the same validation batches on every rank
    val = [sample_batch(corpus.val, args.batch, cfg.ctx, val_gen) for _ in range(4)]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    def val_loss() -> float:
        model.eval()
        with torch.no_grad(), autocast:
            loss = sum(forward(x.to(device), y.to(device)).item() for x, y in val) / len(val)
        model.train()
        return loss

    history: dict[str, list] = {"step": [], "train_loss": [], "val_step": [], "val_loss": [], "ms_per_step": []}
    for step in range(1, args.steps + 1):
        x, y = (t.to(device) for t in sample_batch(corpus.train, args.batch, cfg.ctx, gen))
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            loss = forward(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        reduced = loss.detach().clone()
        dist.all_reduce(reduced)  # also a sync point, so the time below covers the whole step
        history["ms_per_step"].append(1e3 * (time.perf_counter() - t0))
        history["step"].append(step)
        history["train_loss"].append(reduced.item() / world)  # tensor-parallel ranks hold equal losses
        if step % args.eval_every == 0 or step == args.steps:
            history["val_step"].append(step)
            history["val_loss"].append(val_loss())
            if rank == 0:
                print(f"step {step}: train {history['train_loss'][-1]:.3f}  val {history['val_loss'][-1]:.3f}")
    if rank == 0:
        sent = getattr(opt, "bytes_communicated", 0)
        print(f"{world} ranks, {args.mode}, {args.optimizer}; Muon exchange bytes sent by rank 0: {sent:,}")
        if args.out:
            meta = {
                "mode": args.mode,
                "optimizer": args.optimizer,
                "size": args.size,
                "world_size": world,
                "data_parallel_ranks": data_ranks,
                "batch_per_rank": args.batch,
                "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                "torch": torch.__version__,
                "muon_bytes_rank0": sent,
            }
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "history": history}, f)
    dist.barrier()  # let every rank finish its last collective before tearing the group down
    dist.destroy_process_group()


def _tensor_parallel(model: nn.Module, args: argparse.Namespace, world: int, device_type: str) -> tuple[int, int]:
    """Shard ``model``'s blocks tensor-parallel (and FSDP2 over the other mesh dimension for ``tp_fsdp2``); returns
    (this rank's data-parallel index, the number of data-parallel ranks). Attention's fused qkv output is gathered
    whole (the heads are split from it); the MLP runs column-wise then row-wise on the local features."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = world if args.mode == "tp" else args.tp
    if world % tp:
        raise SystemExit(f"--tp {tp} does not divide the {world} ranks")
    mesh = init_device_mesh(device_type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    plan = {
        "attn.qkv": ColwiseParallel(output_layouts=Replicate()),
        "attn.proj": RowwiseParallel(input_layouts=Replicate()),
        "fc": ColwiseParallel(),
        "fc_proj": RowwiseParallel(),
    }
    for block in model.blocks:  # type: ignore[union-attr]
        parallelize_module(block, mesh["tp"], plan)
    if args.mode == "tp_fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:  # type: ignore[union-attr]
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    return mesh["dp"].get_local_rank(), world // tp


if __name__ == "__main__":
    main()
