"""What the distributed tests share: batches, loss, a single-process reference run, spawning gloo workers."""

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import muonkit

BATCH = 12
STEPS = 4
D = 10


class Net(nn.Module):
    """The sharded tests' model (FSDP2, tensor parallel). Shapes chosen so shards are uneven (22 rows over 3 or 4
    ranks), fused QKV parts straddle shard boundaries, two splits have parts with different lr scales (``kv``:
    16 + 8 rows; ``fc2``: 8 + 14 columns, as a per-head output projection is split, whose columns tensor parallel
    shards)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, D)
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.kv = nn.Linear(D, 24, bias=False)
        self.fc = nn.Linear(D, 22)
        self.fc2 = nn.Linear(22, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 16)

    def forward(self, idx):
        h = self.emb(idx)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        h = h + torch.softmax(q @ k.mT / 3.0, -1) @ v
        h = h + self.kv(h)[..., :D]
        h = h + self.fc2(torch.relu(self.fc(self.norm(h))))
        return self.head(h)


class ExpertNet(Net):
    """``Net`` with a stack of four 10 x 6 expert matrices (``matrix_view="batch"``), orthogonalized per expert:
    sharded on the expert dim under FSDP2 (2 + 2 over 2 ranks, 2 + 2 + 0 over 3), or expert parallel with each
    expert's columns tensor parallel (``test_tensor_parallel``: a DTensor the forward gathers whole)."""

    def __init__(self):
        super().__init__()
        self.experts = nn.Parameter(torch.randn(4, D, 6) / D**0.5)

    def forward(self, idx):
        h = self.emb(idx)
        experts = self.experts.full_tensor() if hasattr(self.experts, "full_tensor") else self.experts
        h = h + torch.einsum("btd,edf->btf", h, experts).repeat(1, 1, 2)[..., :D] / 4
        return self.head(h + self.fc2(torch.relu(self.fc(self.norm(h)))))


# Built-in stages of every slot at once (MuonEq's row normalisation, NorMuon with its row state, cautious decay): the
# sharded tests run them in each layout against one process with the same options
STAGES = {"precondition": "row_norm", "postscale": "normuon", "update": "cautious"}


def net_optimizer(model, **kw):
    """Muon for ``Net`` as the sharded tests run it (QKV split in three, ``kv`` in 16 + 8 rows, ``fc2`` in 8 + 14
    columns, float32 NS)."""
    groups = muonkit.param_groups(model, split={"qkv.weight": 3, "kv.weight": [16, 8], "fc2.weight": {"cols": [8, 14]}})
    return muonkit.Muon(groups, ns_dtype=torch.float32, weight_decay=0.01, adamw_lr=3e-3, **kw)


def full_state(model):
    """``model``'s state dict with every DTensor gathered whole (a collective where there are any)."""
    state = model.state_dict()
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.items()}


def load_checkpoint(model, opt, path):
    """Load a ``torch.distributed.checkpoint`` written by ``save_checkpoint`` into ``model`` and ``opt`` (any layout,
    any world size: DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def checkpoint_steps(model, opt, out, action, source):
    """The steps ``range`` a checkpoint task takes: ``"load"`` reads ``SOURCE.dcp`` (written after 2 steps, by
    ``save_checkpoint`` in any layout) into ``model`` and ``opt``, then steps 2 to ``STEPS``; ``"save"`` steps 0 and 1
    (its caller saves after); any other action every step."""
    if action == "load":
        load_checkpoint(model, opt, f"{out}/{source}.dcp")
        return range(2, STEPS)
    return range(2 if action == "save" else STEPS)


def save_checkpoint(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


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


def spawn(worker, world, out_dir, tasks):
    """Run ``tasks`` one after another on ``world`` gloo processes that start once (each start costs seconds on a
    2-core machine): ``worker(rank, world, out, task)`` runs one task in the initialised process group and returns
    what the tests read. A task ``"name:source"`` is ``name`` reading the checkpoint that task ``source`` wrote in
    ``out_dir`` (at any world size). Returns ``{task: [rank 0's result, rank 1's, ...]}``."""
    mp.spawn(_run_tasks, args=(worker, world, free_port(), str(out_dir), list(tasks)), nprocs=world, join=True)
    return {t: [torch.load(f"{out_dir}/{t}.w{world}.rank{r}", weights_only=False) for r in range(world)] for t in tasks}


def _run_tasks(rank, worker, world, port, out_dir, tasks):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for task in tasks:
        result = worker(rank, world, out_dir, task)
        torch.save(result, f"{out_dir}/{task}.w{world}.rank{rank}")
        dist.barrier()  # a task's checkpoint is whole before the next task (or world) reads it
    finish()


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
