"""Muon on tensor-parallel parameters (DTensor ``parallelize_module``: column-wise ``Shard(0)`` and row-wise
``Shard(1)`` weights) and on tensor parallel + FSDP2 (a 2-D mesh), CPU + gloo, several processes; and checkpoints
written through ``torch.distributed.checkpoint`` in one layout (one process, DDP, ZeRO-1, FSDP2, TP, TP + FSDP2)
that continue in every other.

Every matrix is orthogonalized whole on one owner rank, so the weights equal a single process's; orthogonalizing
a tensor-parallel shard on its own would change the update (``test_a_shard_alone_is_not_the_update``).
"""

import pytest
import torch
from torch import nn

import muonkit
from dist_helpers import (
    BATCH,
    STAGES,
    STEPS,
    ExpertNet,
    Net,
    batch,
    checkpoint_steps,
    full_state,
    loss,
    net_optimizer,
    single_run,
    spawn,
)
from dist_helpers import save_checkpoint as save
from muonkit.optim.shards import Layout, _check_tiling, row_blocks

fsdp = pytest.importorskip("torch.distributed.fsdp")
tp = pytest.importorskip("torch.distributed.tensor.parallel")
if not hasattr(fsdp, "fully_shard"):  # pragma: no cover - torch < 2.6
    pytest.skip("this torch has no FSDP2 fully_shard", allow_module_level=True)

MODES = ("single", "ddp", "zero", "fsdp", "tp", "tp_fsdp")


def _build(mode, rank, world, **options):
    """The model in ``mode``'s layout, the module to call, the optimizer, and this rank's share of each batch
    ``(index, count)``: tensor-parallel ranks of one data-parallel rank see the same batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = ExpertNet() if mode in ("ep_tp", "single_ep") else Net()
    call, share, kw = model, (rank, world), {}
    if mode in ("single", "single_ep"):  # single_ep: ExpertNet in one process
        share = (0, 1)
    elif mode == "ep_tp":  # expert parallel over "ep", each expert's columns tensor parallel over "tp"
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("ep", "tp"))
        model.experts = nn.Parameter(distribute_tensor(model.experts.data, mesh, [Shard(0), Shard(2)]))
        share = (0, 1)
    elif mode in ("ddp", "zero"):
        call = nn.parallel.DistributedDataParallel(model)
        kw = {"executor": muonkit.distributed.ReplicatedExecutor(shard_state=mode == "zero")}
    elif mode == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
        for module in (model.qkv, model.kv, model.fc, model.fc2, model.head):
            fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:  # tp: every rank one tensor-parallel rank; tp_fsdp: a (2, world/2) mesh, FSDP2 over "dp"
        shape, names = ((world,), ("tp",)) if mode == "tp" else ((2, world // 2), ("dp", "tp"))
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        colwise = ColwiseParallel(output_layouts=Replicate())  # outputs whole: the model's maths is unchanged
        rowwise = RowwiseParallel(input_layouts=Replicate())
        plan = {"qkv": colwise, "kv": colwise, "fc": colwise, "fc2": rowwise, "head": rowwise}
        parallelize_module(model, mesh["tp"], plan)
        share = (0, 1)
        if mode == "tp_fsdp":
            for module in (model.qkv, model.kv, model.fc, model.fc2, model.head):
                fully_shard(module, mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
            share = (mesh["dp"].get_local_rank(), 2)
    return model, call, net_optimizer(model, **kw, **options), share


def _given_grads(model, t):
    """Step ``t``'s gradients, the same whole tensors in every layout (each rank given its block of a sharded
    parameter): what makes the optimizer's own arithmetic comparable bit for bit, apart from the model's."""
    import zlib

    for name, p in model.named_parameters():
        g = torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode()) + t))
        if hasattr(p, "placements"):  # this rank's block, where torch says it lies (FSDP2 over TP: _StridedShard)
            from torch.distributed.tensor import DTensor
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            size, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            block = g[tuple(slice(o, o + s) for o, s in zip(offset, size))].contiguous()
            mesh, placements = p.device_mesh, p.placements
            g = DTensor.from_local(block, mesh, placements, run_check=False, shape=p.shape, stride=p.stride())
        p.grad = g


def _worker(rank, world, out, task):
    """``train-MODE``: 4 steps; ``save-MODE``: 2 steps, then a DCP checkpoint ``MODE.dcp``; ``load-MODE:SOURCE``:
    load ``SOURCE.dcp`` into ``MODE``'s layout, then steps 2 and 3; ``given-MODE``: 4 steps on ``_given_grads``;
    ``stages-MODE``: 4 steps with the built-in stages ``STAGES``."""
    kind, _, source = task.partition(":")
    action, mode = kind.split("-", 1)
    model, call, opt, (index, count) = _build(mode, rank, world, **(STAGES if action == "stages" else {}))
    for t in checkpoint_steps(model, opt, out, action, source):
        x, y = batch(t)
        per = BATCH // count
        opt.zero_grad()
        if action == "given":
            _given_grads(model, t)
        else:
            loss(call, x[index * per : (index + 1) * per], y[index * per : (index + 1) * per]).backward()
        opt.step()
    if action == "save":
        save(model, opt, f"{out}/{mode}.dcp")
    buf = opt.state[model.fc2.weight]["momentum_buffer"]
    return {
        "state": full_state(model),
        "bytes": opt.bytes_communicated,
        "fc2_buffer": (tuple(getattr(buf, "placements", ())), tuple(muonkit.distributed.local(buf).shape)),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four process starts. One process and 2 ranks save a checkpoint in each of their layouts and load every
    other's; 4 ranks train TP and TP + FSDP2, load every 2-rank checkpoint into TP + FSDP2, save TP + FSDP2 and
    load that into DDP, FSDP2 and TP at 4 ranks; one process loads every checkpoint at the end."""
    out = tmp_path_factory.mktemp("tp")
    two = [m for m in MODES if m not in ("single", "tp_fsdp")]
    runs = {1: spawn(_worker, 1, out, ["save-single", "given-single", "given-single_ep"])}
    runs[2] = spawn(_worker, 2, out, ["train-tp", "stages-tp", *[f"save-{m}" for m in two],
                                      *[f"load-{m}:{s}" for m in two for s in ["single", *two] if s != m]])  # fmt: skip
    four = ["train-tp", "train-tp_fsdp", "stages-tp_fsdp", *[f"load-tp_fsdp:{s}" for s in ["single", *two]],
            "save-tp_fsdp", *[f"load-{m}:tp_fsdp" for m in ("ddp", "fsdp", "tp")]]  # fmt: skip
    runs[4] = spawn(_worker, 4, out, [*four, "train-ep_tp", *[f"given-{m}" for m in MODES[1:]], "given-ep_tp"])
    runs[1].update(spawn(_worker, 1, out, [f"load-single:{s}" for s in MODES if s != "single"]))
    return runs


@pytest.fixture(scope="module")
def reference():
    return single_run(Net, net_optimizer, STEPS)


def _assert_close(results, reference, atol=1e-6):
    for r in results:
        for name, value in reference.items():
            assert torch.allclose(r["state"][name], value, atol=atol, rtol=0), name


@pytest.mark.parametrize(("world", "mode"), [(2, "tp"), (4, "tp"), (4, "tp_fsdp")])
def test_tensor_parallel_muon_equals_single_process(world, mode, runs, reference):
    from torch.distributed.tensor import Shard

    results = runs[world][f"train-{mode}"]
    _assert_close(results, reference)
    placements, local_shape = results[0]["fc2_buffer"]  # fc2 is row-wise: its weight (10 x 22) split on dim 1
    assert Shard(1) in placements and local_shape[1] < 22  # the momentum is sharded like the weight
    assert results[0]["bytes"] > 0  # whole matrices were assembled on their owners


@pytest.mark.parametrize(("world", "mode"), [(2, "tp"), (4, "tp_fsdp")])
def test_built_in_stages_under_tensor_parallel_equal_single_process(world, mode, runs):
    """Row normalisation before NS, NorMuon's row state after it and cautious decay, on TP and TP + FSDP2: as one
    process with the same options, which differs from plain Muon's result."""
    alone = single_run(Net, lambda m: net_optimizer(m, **STAGES), STEPS)
    _assert_close(runs[world][f"stages-{mode}"], alone)
    assert not torch.allclose(alone["fc.weight"], single_run(Net, net_optimizer, STEPS)["fc.weight"], atol=1e-3)


def test_expert_parallel_stacks_with_tensor_parallel_experts_equal_single_process(runs):
    """Four experts over 2 expert-parallel ranks, each expert's 6 columns over 2 tensor-parallel ranks (a 2 x 2
    mesh, ``[Shard(0), Shard(2)]``): each expert is assembled whole and orthogonalized on its own, as in one
    process (``test_fsdp.test_an_expert_stack_is_orthogonalized_per_expert``)."""
    _assert_close(runs[4]["train-ep_tp"], single_run(ExpertNet, net_optimizer, STEPS))
    assert runs[4]["train-ep_tp"][0]["bytes"] > 0


def test_the_exchange_sends_each_element_once_each_way(runs):
    """The bytes of one all-to-all of the updates to their owners plus one of the results back, and nothing more:
    every element of a Muon matrix that its owner does not hold crosses once each way, 4 bytes each (float32
    updates, float32 NS). At 2 ranks every sharded dim splits evenly, so whichever rank owns a matrix holds half
    of it; expert parallel with TP experts on 2 x 2: each rank holds a quarter of the (4, 10, 6) stack."""
    muon_numel = 30 * 10 + 24 * 10 + 22 * 10 + 10 * 22  # qkv, kv, fc (column-wise), fc2 (row-wise); the rest AdamW
    assert sum(r["bytes"] for r in runs[2]["train-tp"]) == STEPS * (muon_numel // 2) * (4 + 4)
    assert sum(r["bytes"] for r in runs[4]["train-ep_tp"]) == STEPS * (240 - 60) * (4 + 4)


@pytest.mark.parametrize(("world", "mode", "source"), [
    *[(2, m, s) for m in ("ddp", "zero", "fsdp", "tp") for s in ("single", "ddp", "zero", "fsdp", "tp") if s != m],
    *[(4, "tp_fsdp", s) for s in ("single", "ddp", "zero", "fsdp", "tp")],
    *[(4, m, "tp_fsdp") for m in ("ddp", "fsdp", "tp")],
    *[(1, "single", s) for s in MODES if s != "single"],
])  # fmt: skip
def test_a_checkpoint_continues_in_another_layout(world, mode, source, runs, reference):
    """Saved after 2 steps in ``source``'s layout, loaded into ``mode``'s (another world size where they differ),
    steps 2 and 3 there: the 4-step single-process weights."""
    _assert_close(runs[world][f"load-{mode}:{source}"], reference)


def test_a_shard_alone_is_not_the_update():
    """What the equality above rules out: orthogonalizing each row-wise (column) shard of a matrix on its own
    gives another update (cosine well below 1)."""
    torch.manual_seed(0)
    g = torch.randn(10, 22)
    whole = muonkit.orthogonalize(g, dtype=torch.float32)
    halves = torch.cat([muonkit.orthogonalize(h, dtype=torch.float32) for h in g.chunk(2, dim=1)], dim=1)
    assert float(torch.nn.functional.cosine_similarity(whole.flatten(), halves.flatten(), dim=0)) < 0.95


def test_blocks_that_do_not_tile_the_tensor_are_refused():
    shape = (6, 4)
    _check_tiling(row_blocks(shape, 4), shape, ())  # 2 + 2 + 2 + 0 rows: fine
    _check_tiling((((0, 6), (0, 2)), ((0, 6), (2, 2))), shape, ())  # two column blocks: fine
    for bad in [(((0, 4), (0, 4)), ((3, 3), (0, 4))), (((0, 3), (0, 4)),), (((0, 6), (0, 4)), ((0, 6), (0, 4)))]:
        with pytest.raises(ValueError, match="not one rectangular block"):
            _check_tiling(bad, shape, ())
    assert Layout(None, 1, 0, row_blocks(shape, 1)).blocks == (((0, 6), (0, 4)),)


@pytest.mark.parametrize("mode", [*MODES[1:], "ep_tp"])
def test_given_the_same_gradients_every_layout_steps_bit_for_bit_as_one_process(mode, runs):
    """The same whole gradients in every layout (``_given_grads``; the model's own forward and backward round
    differently per layout, so trained weights agree to 1e-6 only): 4 ranks' weights equal one process's exactly."""
    want = runs[1]["given-single_ep" if mode == "ep_tp" else "given-single"][0]["state"]
    for r in runs[4][f"given-{mode}"]:
        for name, value in want.items():
            assert torch.equal(r["state"][name], value), (mode, name, (r["state"][name] - value).abs().max())
