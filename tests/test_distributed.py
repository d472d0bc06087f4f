"""Distributed Muon on CPU with the gloo backend: several processes via torch.multiprocessing."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import muonkit
import stage_examples
from dist_helpers import BATCH, STEPS, batch, loss, single_run, spawn
from muonkit.distributed import ReplicatedExecutor, assign_jobs, shard_rows


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 12)
        self.qkv = nn.Linear(12, 36, bias=False)
        self.fc = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 12)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 16)

    def forward(self, idx):
        h = self.emb(idx)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        h = h + torch.softmax(q @ k.mT / 3.0, -1) @ v
        h = h + self.fc2(torch.relu(self.fc(self.norm(h))))
        return self.head(h)


def _optimizer(model, executor=None, stages=False, normuon=False):
    """``stages``: the pipeline stages of ``stage_examples`` in every slot (registered in this process); ``normuon``:
    the built-in postscale stage that keeps per-row state."""
    groups = muonkit.param_groups(model, split={"qkv.weight": 3})
    extra = stage_examples.register() if stages else {"postscale": "normuon"} if normuon else {}
    return muonkit.Muon(groups, ns_dtype=torch.float32, weight_decay=0.01, adamw_lr=3e-3, executor=executor, **extra)


def _single(steps=STEPS):
    return single_run(Net, _optimizer, steps)


def _worker(rank, world, out, task):
    """One task on this rank (see ``dist_helpers.spawn``): train (or save / resume) and return what tests read."""
    task, _, source = task.partition(":")
    torch.manual_seed(0)
    model = Net()
    ddp = nn.parallel.DistributedDataParallel(model)
    zero = task.startswith("zero")
    executor = ReplicatedExecutor(exchange="all_reduce" if task == "all_reduce" else "all_gather", shard_state=zero)
    opt = _optimizer(model, executor, stages=task == "zero-stages", normuon=task.endswith("normuon"))
    first, steps = 0, STEPS
    if task in ("resume", "zero-resume"):
        ckpt = torch.load(f"{out}/{source}.ckpt", weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        first = ckpt["step"]
    if task in ("save", "zero-save"):
        steps = 2
    result = {}
    try:
        for t in range(first, steps):
            x, y = batch(t)
            per = BATCH // world
            xs, ys = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
            opt.zero_grad()
            if task == "accumulate":  # two micro-batches, gradients synchronised only on the second
                half = per // 2
                with ddp.no_sync():
                    (loss(ddp, xs[:half], ys[:half]) / 2).backward()
                (loss(ddp, xs[half:], ys[half:]) / 2).backward()
            else:
                loss(ddp, xs, ys).backward()
            if task == "nan" and rank == world - 1:
                model.fc.weight.grad[0, 0] = float("nan")  # after DDP's all-reduce: only this rank sees it
            opt.step()
    except (muonkit.NonFiniteGradientError, ValueError) as err:
        result["error"] = str(err)
    result["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result["bytes"] = opt.bytes_communicated
    buf = opt.state[model.fc.weight].get("momentum_buffer")  # none after a step that raised
    result["buffer_rows"] = None if buf is None else buf.shape[0]
    if task in ("save", "zero-save"):
        opt_state = opt.state_dict()  # with shard_state a collective: every rank calls it
        if rank == 0:
            torch.save({"model": model.state_dict(), "opt": opt_state, "step": steps}, f"{out}/{task}.ckpt")
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every multi-process scenario of this file, in three process starts: ``runs[world][task]`` holds each
    rank's result. The world of 2 runs first: the worlds of 3 and 1 resume its checkpoints."""
    out = tmp_path_factory.mktemp("ddp")
    runs = {2: spawn(_worker, 2, out, ["train", "zero", "zero-save", "save", "accumulate", "nan", "zero-stages",
                                      "normuon", "zero-normuon"])}  # fmt: skip
    runs[3] = spawn(_worker, 3, out, ["train", "all_reduce", "zero", "zero-resume:zero-save", "resume:zero-save",
                                      "resume:save"])  # fmt: skip
    runs[1] = spawn(_worker, 1, out, ["train", "resume:save"])
    return runs


@pytest.fixture(scope="module")
def reference():
    return _single(STEPS)


def test_bad_options_are_refused_before_anything_runs():
    with pytest.raises(ValueError, match="exchange"):
        ReplicatedExecutor(exchange="broadcast")
    with pytest.raises(ValueError, match="comm_dtype"):
        ReplicatedExecutor(comm_dtype=torch.int8)
    with pytest.raises(ValueError, match="comm_dtype"):
        muonkit.Muon([nn.Parameter(torch.zeros(2, 2))], comm_dtype="bf16")
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            ReplicatedExecutor()


def test_assign_jobs_carries_load_across_calls():
    load = [0.0, 0.0]
    assert assign_jobs([5.0], 2, load) == [0] and load == [5.0, 0.0]
    assert assign_jobs([1.0, 1.0], 2, load) == [1, 1] and load == [5.0, 2.0]


def test_assign_jobs_balances_and_is_deterministic():
    owners = assign_jobs([8, 7, 6, 5, 4, 3, 2, 1], 3)
    loads = [sum(c for c, o in zip([8, 7, 6, 5, 4, 3, 2, 1], owners) if o == r) for r in range(3)]
    assert max(loads) - min(loads) <= 2 and owners == assign_jobs([8, 7, 6, 5, 4, 3, 2, 1], 3)
    assert assign_jobs([1.0] * 5, 1) == [0] * 5


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ddp_sharded_muon_equals_single_process(world, runs, reference):
    results = runs[world]["train"]
    for r in results:
        for name, value in reference.items():
            assert torch.allclose(r["state"][name], value, atol=1e-6, rtol=0), (world, name)
    # every rank ends with identical weights, and ranks > 1 really exchanged work
    for r in results[1:]:
        assert all(torch.equal(r["state"][k], results[0]["state"][k]) for k in reference)
    assert (results[0]["bytes"] > 0) == (world > 1)


def test_all_reduce_exchange_is_equal_and_all_gather_sends_less(runs, reference):
    gathered, reduced = runs[3]["train"], runs[3]["all_reduce"]
    for name, value in reference.items():
        assert torch.allclose(reduced[2]["state"][name], value, atol=1e-6, rtol=0), name
    # ring all-reduce sends 2 (W-1)/W of the buffer, all-gather (W-1)/W (plus padding to the largest share)
    assert gathered[0]["bytes"] < 0.75 * reduced[0]["bytes"]


@pytest.mark.parametrize("world", [2, 3])
def test_zero1_state_sharding_equals_single_process(world, runs, reference):
    results = runs[world]["zero"]
    for r in results:
        for name, value in reference.items():
            assert torch.allclose(r["state"][name], value, atol=1e-6, rtol=0), (world, name)
    # each rank holds only its rows of the momentum (fc.weight has 24 rows)
    assert [r["buffer_rows"] for r in results] == shard_rows(24, world)


@pytest.mark.parametrize("world", [2, 3])
def test_zero1_sends_rows_to_owners_and_results_once(world, runs):
    """Per step and rank, exactly: this rank's rows of the matrices others own (to their owners), and each whole
    result it owns to the W-1 other ranks; nothing else. Fewer bytes in total than the scheme it replaced (rows
    of each result back to their ranks, then every rank's rows to every rank)."""
    from muonkit.optim.stages import ns_flops

    # qkv (a group of its own, for its split; exchanged whole and split on its owner), then fc and fc2: owners are
    # balanced within each group's call
    calls = [[(36, 12)], [(24, 12), (12, 24)]]
    sent, before = [0] * world, [0] * world
    for shapes in calls:
        load = [0.0] * world
        for shape in shapes:
            (owner,) = assign_jobs([float(ns_flops(shape))], world, load)
            rows, cols = shard_rows(shape[0], world), shape[1]
            for rank in range(world):
                out = 0 if owner == rank else rows[rank] * cols * 4
                sent[rank] += out + (world - 1) * shape[0] * cols * 4 * (owner == rank)
                back = (shape[0] - rows[rank]) * cols * 4 * (owner == rank)
                before[rank] += out + back + (world - 1) * rows[0] * cols * 4
    assert [r["bytes"] for r in runs[world]["zero"]] == [STEPS * b for b in sent]
    assert sum(sent) < sum(before)


def test_zero1_runs_the_pipelines_added_stages_as_one_process_does(runs):
    """Stages added to every slot of the step pipeline run under ZeRO-1 state sharding (momentum rows here, NS on
    the owner, the update stage on the whole matrices) as in one process; and they change the trajectory."""
    with_stages = single_run(Net, lambda m: _optimizer(m, stages=True))
    plain = _single()
    for r in runs[2]["zero-stages"]:
        for name, value in with_stages.items():
            assert torch.allclose(r["state"][name], value, atol=1e-6, rtol=0), name
    assert not torch.allclose(with_stages["fc.weight"], plain["fc.weight"], atol=1e-3)


@pytest.mark.parametrize("task", ["normuon", "zero-normuon"])
def test_ddp_and_zero1_run_a_stage_with_row_state_as_one_process_does(task, runs):
    """NorMuon's per-row state: under DDP it travels with the NS results; under ZeRO-1 each owner updates it and
    one all-reduce shares it. Either way every rank holds the one-process weights."""
    alone = single_run(Net, lambda m: _optimizer(m, normuon=True))
    for r in runs[2][task]:
        assert "error" not in r
        for name, value in alone.items():
            assert torch.allclose(r["state"][name], value, atol=1e-6, rtol=0), name
    assert not torch.allclose(alone["fc.weight"], _single()["fc.weight"], atol=1e-3)


@pytest.mark.parametrize("resume", ["zero-resume", "resume"])
def test_zero1_checkpoint_at_two_ranks_resumes_at_three(resume, runs, reference):
    """The saved state holds whole buffers (gathered), so it loads with or without state sharding."""
    results = runs[3][f"{resume}:zero-save"]
    for name, value in reference.items():
        assert torch.allclose(results[0]["state"][name], value, atol=1e-6, rtol=0), name


def test_gradient_accumulation_with_no_sync(runs, reference):
    """Micro-batches under DDP.no_sync, one optimizer step per batch: the same trajectory as one big batch."""
    results = runs[2]["accumulate"]
    for name, value in reference.items():
        assert torch.allclose(results[1]["state"][name], value, atol=1e-6, rtol=0), name


def test_nan_on_one_rank_makes_every_rank_raise(runs):
    results = runs[2]["nan"]
    assert all("error" in r for r in results)
    assert "another rank" in results[0]["error"] and "'fc.weight'" in results[1]["error"]


@pytest.mark.parametrize("resume_world", [3, 1])
def test_save_at_two_ranks_resume_at_another_world_size(resume_world, runs, reference):
    results = runs[resume_world]["resume:save"]
    for name, value in reference.items():
        assert torch.allclose(results[0]["state"][name], value, atol=1e-6, rtol=0), name
