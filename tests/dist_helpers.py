"""What the distributed tests share: batches, loss, a single-process reference run, spawning gloo workers."""

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

BATCH = 12
STEPS = 4


def batch(t):
    """Step t's batch: tokens 0..15 and the next-token rule y = 5 x + 3 mod 16."""
    gen = torch.Generator().manual_seed(100 + t)
    x = torch.randint(0, 16, (BATCH, 6), generator=gen)
    return x, (x * 5 + 3) % 16


def loss(model, x, y):
    return nn.functional.cross_entropy(model(x).reshape(-1, 16), y.reshape(-1))


def single_run(make_model, make_optimizer, steps=STEPS):
    """Weights after ``steps`` single-process steps on the full batches (the reference)."""
    torch.manual_seed(0)
    model = make_model()
    opt = make_optimizer(model)
    for t in range(steps):
        x, y = batch(t)
        opt.zero_grad()
        loss(model, x, y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, world, tmp_path, task="train"):
    """Run ``worker(rank, world, port, out, task)`` on ``world`` processes; return what each saved to out.rank{r}."""
    out = str(tmp_path / "run")
    mp.spawn(worker, args=(world, free_port(), out, task), nprocs=world, join=True)
    return [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(world)]


def finish():
    """End a worker: leave the process group together, then exit without interpreter teardown.

    A resumed FSDP2 worker once died with SIGABRT ("terminate called without an active exception") after its
    results were saved: a C++ thread (gloo or torch.distributed.checkpoint) still joinable when static
    destructors ran at exit. Everything a test reads is written before this point, so the worker skips that
    teardown (``os._exit``) instead of letting a race in third-party clean-up fail the run.
    """
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
