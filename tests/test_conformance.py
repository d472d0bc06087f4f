"""Every path a Muon step can take, against one reference: ``reference.muon_reference_step`` (a plain loop with
float64 Newton-Schulz). Three steps of the same gradients through

- ``Muon``, the optimizer class (its torch path on CPU);
- ``muon_step``, the functional step;
- the fused path (``accel.fused`` kernels and step plans; on CPU in Triton's interpreter);
- ``ReplicatedExecutor``, the DDP executor, in a process group of one rank;
- DTensor parameters (the FSDP2 path, ``sharded_muon_step``), on a one-rank device mesh.

Paths with float64 NS must agree with the reference to 1e-12; the fused path computes NS in float32 at most
(1e-5). With stages of the pipeline's slots other than the defaults (``stage_examples``, against their
references), every path computes them; the fused path declines such a step and the torch path takes it. Several
ranks, ZeRO-1 state and checkpoints across world sizes are compared with single-process runs in
``test_distributed.py`` and ``test_fsdp.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import stage_examples
from muonkit import Muon
from muonkit.coefficients import get
from muonkit.optim import functional, pipeline, plans
from muonkit.reference import muon_reference_step

SHAPES = [(6, 4), (4, 6), (5, 5), (8, 3), (6, 4)]
STEPS = 3
PATHS = ["muon", "muon_step", "fused", "executor", "sharded"]


def _grads(shapes, t):
    gen = torch.Generator().manual_seed(100 + t)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]


@pytest.fixture(scope="module")
def one_rank():
    """A gloo process group of one rank, in this process, for the executor and DTensor paths."""
    if dist.is_initialized():  # pragma: no cover - someone else's group
        yield
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _run(path: str, params: list[torch.Tensor], kw: dict, monkeypatch) -> list[torch.Tensor]:
    """``STEPS`` steps of ``params`` (float64 on entry) through ``path``; the weights afterwards, float64."""
    if path == "muon":
        ps = [nn.Parameter(p.clone()) for p in params]
        opt = Muon(ps, ns_dtype=torch.float64, momentum_dtype=None, **kw)
        for t in range(STEPS):
            for p, g in zip(ps, _grads(SHAPES, t)):
                p.grad = g
            opt.step()
        return [p.detach() for p in ps]
    if path == "muon_step" or path == "fused":
        fused_path = path == "fused"
        if fused_path:
            pytest.importorskip("triton")
            if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
                pytest.skip("no CUDA and Triton's interpreter is off")
            monkeypatch.setattr(functional, "_fused_step_applies", lambda *a: True)
            ran = []
            real = plans._StepPlan.run  # every fused step runs a plan (a new one, or a remembered one)
            monkeypatch.setattr(plans._StepPlan, "run", lambda self, *a: ran.append(1) or real(self, *a))
        dtype = torch.float32 if fused_path else torch.float64  # the fused kernels take float32 at most
        device = "cuda" if fused_path and torch.cuda.is_available() else "cpu"  # compiled there, else interpreted
        ps = [p.clone().to(device, dtype) for p in params]
        bufs = [torch.zeros_like(p) for p in ps]
        opts = dict(coefficients="jordan", ns_steps=5, eps=1e-7, ns_dtype=dtype, **kw)
        for t in range(STEPS):
            functional.muon_step(ps, [g.to(device, dtype) for g in _grads(SHAPES, t)], bufs, **opts)
        if fused_path:  # the fused path really ran, where every stage has a fused form
            assert len(ran) == (STEPS if pipeline.fused_stages(kw) else 0)
        return [p.double().cpu() for p in ps]
    if path == "executor":
        from muonkit.distributed import ReplicatedExecutor

        ps = [nn.Parameter(p.clone()) for p in params]
        opt = Muon(ps, ns_dtype=torch.float64, momentum_dtype=None, executor=ReplicatedExecutor(), **kw)
        for t in range(STEPS):
            for p, g in zip(ps, _grads(SHAPES, t)):
                p.grad = g
            opt.step()
        return [p.detach() for p in ps]
    assert path == "sharded"
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    ps = [nn.Parameter(distribute_tensor(p.clone(), mesh, [Shard(0)])) for p in params]
    opt = Muon(ps, ns_dtype=torch.float64, momentum_dtype=None, **kw)
    for t in range(STEPS):
        for p, g in zip(ps, _grads(SHAPES, t)):
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
        opt.step()
    return [p.detach().full_tensor() for p in ps]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "kw",
    [
        dict(lr=0.03, momentum=0.9, nesterov=True, weight_decay=0.1, adjust_lr="original"),
        dict(lr=0.05, momentum=0.95, nesterov=False, weight_decay=0.0, adjust_lr="match_rms_adamw"),
        dict(lr=0.02, momentum=0.5, nesterov=True, weight_decay=0.01, adjust_lr=None),
        dict(lr=0.03, momentum=0.9, nesterov=True, weight_decay=0.5, adjust_lr="original", **stage_examples.NAMES),
        dict(lr=0.03, momentum=0.9, nesterov=True, weight_decay=0.5, adjust_lr="original", update="cautious"),
    ],
    ids=["nesterov-decay", "plain-rms", "no-scale", "added-stages", "cautious-decay"],
)
def test_every_step_path_equals_the_reference(path, kw, one_rank, monkeypatch):
    gen = torch.Generator().manual_seed(7)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    ref = [p.clone() for p in params]
    bufs = [torch.zeros_like(p) for p in ref]
    rows = get("jordan").schedule(5)
    ref_kw = {k: v for k, v in kw.items() if k not in ("adjust_lr", *stage_examples.NAMES)}
    stage_examples.register()
    ref_kw.update({slot: pipeline.get_stage(slot, kw[slot]).reference for slot in stage_examples.NAMES if slot in kw})
    for t in range(STEPS):
        muon_reference_step(ref, _grads(SHAPES, t), bufs, **ref_kw, rows=rows, adjust=kw["adjust_lr"])
    got = _run(path, params, kw, monkeypatch)
    tol = 1e-5 if path == "fused" else 1e-12
    for g, r, p in zip(got, ref, params):
        assert not torch.equal(r, p)  # the reference moved
        torch.testing.assert_close(g, r, rtol=0, atol=tol)
