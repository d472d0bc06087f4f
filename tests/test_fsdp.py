"""Muon on FSDP2 (``fully_shard``) parameters, CPU + gloo, several processes.

FSDP2 shards every parameter on dim 0 as a DTensor; Muon assembles each matrix on one owner rank,
orthogonalizes it there and sends the rows back. These tests check that the result equals a
single-process run, that a NaN on one rank stops every rank, and that a checkpoint written with
``torch.distributed.checkpoint`` at one world size continues the same trajectory at another.
"""

import pytest
import torch

import dist_helpers
import muonkit
from dist_helpers import BATCH, STEPS, D, ExpertNet, Net, batch, full_state, loss, net_optimizer, single_run, spawn
from dist_helpers import save_checkpoint as save
from muonkit.distributed import shard_rows

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):  # pragma: no cover - torch < 2.6
    pytest.skip("this torch has no FSDP2 fully_shard", allow_module_level=True)


def _single(steps=STEPS):
    return single_run(Net, net_optimizer, steps)


def _worker(rank, world, out, task):
    """One task on this rank (see ``dist_helpers.spawn``): train (or save / resume) and return what tests read."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    task, _, source = task.partition(":")
    # a CPU mesh, stated: without one, fully_shard takes the accelerator's device type (CUDA where there is one)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = ExpertNet() if task == "experts" else Net()
    for module in (model.qkv, model.kv, model.fc, model.fc2, model.head):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    normuon = task.startswith("normuon")  # also normuon-save and normuon-resume (its state through DCP)
    kw = {"bf16": {"comm_dtype": torch.bfloat16}, "stages": dist_helpers.STAGES}.get(
        task, {"postscale": "normuon"} if normuon else {}
    )
    task = task.removeprefix("normuon-") if task != "normuon" else task
    opt = net_optimizer(model, **kw)
    steps = dist_helpers.checkpoint_steps(model, opt, out, "load" if task == "resume" else task, source)
    result = {}
    try:
        for t in steps:
            x, y = batch(t)
            per = BATCH // world
            opt.zero_grad()
            xs, ys = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
            if task == "accumulate":  # two micro-batches, gradients reduce-scattered only after the second
                half = per // 2
                model.set_requires_gradient_sync(False)
                (loss(model, xs[:half], ys[:half]) / 2).backward()
                model.set_requires_gradient_sync(True)
                (loss(model, xs[half:], ys[half:]) / 2).backward()
            else:
                loss(model, xs, ys).backward()
            if task == "nan" and rank == world - 1:
                model.fc.weight.grad.to_local()[0, 0] = float("nan")  # only this rank's shard sees it
            opt.step()
    except muonkit.NonFiniteGradientError as err:
        result["error"] = str(err)
    if task == "save":
        save(model, opt, f"{out}/{'normuon-' if normuon else ''}{task}.dcp")
    result["state"] = full_state(model)
    result["bytes"] = opt.bytes_communicated
    buf = opt.state[model.fc.weight].get("momentum_buffer")  # none after a step that raised
    result["buffer_local_rows"] = None if buf is None else buf.to_local().shape[0]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every multi-process scenario of this file, in three process starts: ``runs[world][task]`` holds each
    rank's result. The world of 2 runs first: the worlds of 3 and 1 resume its checkpoint."""
    out = tmp_path_factory.mktemp("fsdp")
    runs = {2: spawn(_worker, 2, out, ["train", "accumulate", "bf16", "save", "nan", "experts", "normuon", "stages",
                                      "normuon-save"])}  # fmt: skip
    runs[3] = spawn(_worker, 3, out, ["train", "resume:save", "experts", "normuon", "normuon-resume:normuon-save"])
    runs[1] = spawn(_worker, 1, out, ["train", "resume:save"])
    return runs


@pytest.fixture(scope="module")
def reference():
    return _single(STEPS)


def _assert_close(results, reference, atol):
    for r in results:
        for name, value in reference.items():
            assert torch.allclose(r["state"][name], value, atol=atol, rtol=0), name


def test_shard_rows_follow_torch_chunk():
    for rows in range(0, 13):
        for world in range(1, 6):
            expected = [len(c) for c in torch.empty(rows).chunk(world)] if rows else []
            expected += [0] * (world - len(expected))
            assert shard_rows(rows, world) == expected, (rows, world)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_fsdp2_muon_equals_single_process(world, runs, reference):
    results = runs[world]["train"]
    _assert_close(results, reference, atol=1e-6)
    # the momentum is sharded like the weight (22 rows: chunks of 11 or 8), and ranks > 1 exchanged rows
    assert results[0]["buffer_local_rows"] == shard_rows(22, world)[0]
    assert (results[0]["bytes"] > 0) == (world > 1)


def test_fsdp2_gradient_accumulation_without_sync(runs, reference):
    """Micro-batches with set_requires_gradient_sync(False) (FSDP2's no_sync): the big-batch trajectory."""
    _assert_close(runs[2]["accumulate"], reference, atol=1e-6)


def test_fsdp2_bf16_comm_stays_close(runs, reference):
    results = runs[2]["bf16"]
    _assert_close(results, reference, atol=2e-3)
    exact = runs[2]["train"]
    assert results[0]["bytes"] < exact[0]["bytes"]  # updates travel to their owners in half the bytes


def test_fsdp2_nan_on_one_rank_makes_every_rank_raise(runs):
    results = runs[2]["nan"]
    assert all("error" in r for r in results)
    assert "another rank" in results[0]["error"] and "'fc.weight'" in results[1]["error"]
    # nothing was updated: the weights still equal the untrained model
    torch.manual_seed(0)
    fresh = Net().state_dict()
    assert all(torch.equal(results[0]["state"][k], v) for k, v in fresh.items())


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_expert_stacks_equal_single_process(world, runs):
    """Expert stacks sharded on the expert dim (a rank may hold none) step as in one process."""
    _assert_close(runs[world]["experts"], single_run(ExpertNet, net_optimizer, STEPS), atol=1e-6)


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_runs_a_stage_with_row_state_as_one_process_does(world, runs):
    """NorMuon's per-row state, whole on every rank: each owner updates its matrices' and one all-reduce shares
    them, so every rank steps as one process does."""
    alone = single_run(Net, lambda m: net_optimizer(m, postscale="normuon"))
    _assert_close(runs[world]["normuon"], alone, atol=1e-6)
    assert not torch.allclose(alone["fc.weight"], _single()["fc.weight"], atol=1e-3)
    if world == 3:  # saved through DCP at 2 ranks after 2 steps, resumed here: the row state came along
        _assert_close(runs[3]["normuon-resume:normuon-save"], alone, atol=1e-6)


def test_fsdp2_runs_the_built_in_stages_as_one_process_does(runs):
    """Row normalisation before NS, NorMuon after it and cautious decay at once, on FSDP2 at 2 ranks."""
    _assert_close(runs[2]["stages"], single_run(Net, lambda m: net_optimizer(m, **dist_helpers.STAGES)), atol=1e-6)


def test_an_expert_stack_is_orthogonalized_per_expert():
    """In one process (what the sharded runs equal): each expert's update is the orthogonalized momentum of that
    expert alone, never of the stack as one 4 x 60 slab."""
    torch.manual_seed(0)
    model = ExpertNet()
    opt = net_optimizer(model)
    group = next(g for g in opt.param_groups if "experts" in g.get("param_names", ()))
    assert group["matrix_view"] == "batch"
    before = model.experts.detach().clone()
    x, y = batch(0)
    loss(model, x, y).backward()
    g = model.experts.grad.clone()
    opt.step()
    lr = group["lr"]
    step = before * (1 - lr * group["weight_decay"]) - model.experts.detach()
    scale = lr * (D / 6) ** 0.5  # rows over cols of one expert: the "original" lr rule
    u = g * (1 - 0.95) * (1 + 0.95)  # first step: buf = 0.05 g, Nesterov u = g.lerp(buf, 0.95)
    for e in range(4):
        want = muonkit.orthogonalize(u[e], dtype=torch.float32, method="newton_schulz") * scale
        torch.testing.assert_close(step[e], want, rtol=1e-4, atol=1e-6)
    slab = muonkit.orthogonalize(u.reshape(4, -1), dtype=torch.float32, method="newton_schulz").reshape(g.shape)
    assert not torch.allclose(step, slab * scale, atol=1e-3)


@pytest.mark.parametrize("resume_world", [3, 1])
def test_fsdp2_checkpoint_at_two_ranks_resumes_at_another_world_size(resume_world, runs, reference):
    _assert_close(runs[resume_world]["resume:save"], reference, atol=1e-6)
