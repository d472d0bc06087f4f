"""NorMuon (``postscale="normuon"``, arXiv 2510.05491): the batched stage against its per-entry reference, the whole
optimizer against an independent transcription of the paper's reference code, and its state through a checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from muonkit import Muon, orthogonalize
from muonkit.optim import pipeline
from muonkit.optim.functional import muon_step


def test_fast_stage_equals_its_reference_over_several_steps():
    stage = pipeline.get_stage("postscale", "normuon")
    assert stage.rows_state
    g = torch.Generator().manual_seed(0)
    S = torch.zeros(3, 5, 1)
    refs = [torch.zeros(5, 1, dtype=torch.float64) for _ in range(3)]
    for _ in range(3):
        O = torch.randn(3, 5, 7, generator=g)
        out = stage.fast(O, S)
        for i in range(3):
            want = stage.reference(O[i].double(), refs[i])
            torch.testing.assert_close(out[i].double(), want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(S[i].double(), refs[i], rtol=1e-6, atol=1e-9)
        # the update keeps the NS output's norm, and its rows are evened out
        torch.testing.assert_close(out.norm(dim=(-2, -1)), O.norm(dim=(-2, -1)), rtol=1e-5, atol=0)


def _reference_normuon(params, grads_per_step, lr, wd, momentum=0.95, beta2=0.95):
    """The paper's reference update (momentum, Nesterov, NS, per-row second moment, norm restored, the shape scale
    max(1, rows/cols)^0.5, decoupled weight decay), written out here for 2-D parameters, NS in float32."""
    bufs = [torch.zeros_like(p) for p in params]
    moments = [torch.zeros(p.shape[0], 1) for p in params]
    for grads in grads_per_step:
        for p, g, buf, v in zip(params, grads, bufs, moments):
            buf.lerp_(g, 1 - momentum)
            u = g.lerp(buf, momentum)
            O = orthogonalize(u, dtype=torch.float32, method="newton_schulz").float()
            norm = O.norm()
            v.lerp_(O.square().mean(dim=-1, keepdim=True), 1 - beta2)
            O = O / (v.sqrt() + 1e-10)
            O = O * (norm / (O.norm() + 1e-10))
            p.mul_(1 - lr * wd)
            p.sub_(lr * max(1.0, p.shape[0] / p.shape[1]) ** 0.5 * O)
    return params


def test_muon_with_normuon_equals_the_reference_update():
    g = torch.Generator().manual_seed(1)
    shapes = [(12, 8), (8, 20), (6, 6)]
    start = [torch.randn(s, generator=g) for s in shapes]
    steps = [[torch.randn(s, generator=g) for s in shapes] for _ in range(4)]
    params = [nn.Parameter(p.clone()) for p in start]
    opt = Muon(params, lr=0.05, weight_decay=0.1, postscale="normuon", method="newton_schulz")
    for grads in steps:
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
    want = _reference_normuon([p.clone() for p in start], steps, lr=0.05, wd=0.1)
    for got, ref in zip(params, want):
        torch.testing.assert_close(got.detach(), ref, rtol=1e-5, atol=1e-6)
    plain = [nn.Parameter(p.clone()) for p in start]
    other = Muon(plain, lr=0.05, weight_decay=0.1)
    for grads in steps:
        for p, gr in zip(plain, grads):
            p.grad = gr.clone()
        other.step()
    assert not torch.allclose(plain[0], params[0], atol=1e-3)  # the stage changes the trajectory


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24, bias=False)
        self.conv = nn.Conv2d(3, 4, 3)
        self.experts = nn.Parameter(torch.randn(2, 6, 8) * 0.1)
        self.norm = nn.LayerNorm(8)


def _grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def _opt(model):
    groups = [
        {"params": [model.qkv.weight], "split": 3, "postscale": "normuon"},  # fused QKV: three matrices
        {"params": [model.conv.weight], "postscale": "normuon"},  # flattened: (4, 27)
        {"params": [model.experts], "matrix_view": "batch", "postscale": "normuon"},  # two 6 x 8 experts
        {"params": [model.conv.bias, model.norm.weight, model.norm.bias], "algorithm": "adamw"},
    ]
    return Muon(groups, lr=0.02)


def test_state_has_one_number_per_matrix_row_and_resumes_bitwise():
    torch.manual_seed(0)
    model = _Net()
    opt = _opt(model)
    for step in range(2):
        _grads(model, step)
        opt.step()
    shapes = {tuple(opt.state[p]["postscale_state"].shape) for p in (model.qkv.weight, model.conv.weight)}
    assert shapes == {(24, 1), (4, 1)} and opt.state[model.experts]["postscale_state"].shape == (2, 6, 1)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    for step in range(2, 4):
        _grads(model, step)
        opt.step()
    resumed = _Net()
    resumed.load_state_dict(saved["model"])
    opt2 = _opt(resumed)
    opt2.load_state_dict(saved["opt"])
    for step in range(2, 4):
        _grads(resumed, step)
        opt2.step()
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_a_state_of_the_wrong_shape_is_refused_on_load():
    model = _Net()
    opt = _opt(model)
    _grads(model, 0)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["postscale_state"] = torch.zeros(5, 1)
    with pytest.raises(ValueError, match=r"postscale_state.*must be \(24, 1\)"):
        _opt(_Net()).load_state_dict(sd)


def test_functional_step_without_the_state_is_a_clear_error():
    p, g, b = torch.zeros(4, 4), torch.ones(4, 4), torch.zeros(4, 4)
    kw = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.0, coefficients="jordan", ns_steps=5,
              adjust_lr="original", eps=1e-7, postscale="normuon")  # fmt: skip
    with pytest.raises(ValueError, match="keeps state per matrix row"):
        muon_step([p], [g], [b], **kw)
    state = torch.zeros(4, 1)
    muon_step([p], [g], [b], **kw, stage_states=[state])
    assert state.abs().sum() > 0 and p.abs().sum() > 0


def test_a_column_matrix_gets_its_state_too():
    """A (rows, 1) parameter's state has the parameter's own shape: it is still made, not taken for existing."""
    p = nn.Parameter(torch.randn(5, 1))
    opt = Muon([p], postscale="normuon")
    p.grad = torch.randn(5, 1)
    opt.step()
    assert opt.state[p]["postscale_state"].shape == (5, 1) and opt.state[p]["postscale_state"].abs().sum() > 0


@pytest.mark.parametrize("split, widths", [({"cols": [3, 5]}, [3, 5]), ({"rows": 2, "cols": 2}, [4, 4])])
def test_column_parts_each_keep_their_own_row_state(split, widths):
    """A per-head output projection (``split={"cols": heads}``): each column block is a matrix of its own, with its
    own second moment per row, as if it were a separate parameter; the state has one column per column part."""
    g = torch.Generator().manual_seed(2)
    start = torch.randn(6, 8, generator=g)
    steps = [torch.randn(6, 8, generator=g) for _ in range(3)]
    p = nn.Parameter(start.clone())
    opt = Muon([p], lr=0.05, weight_decay=0.1, postscale="normuon", method="newton_schulz", split=split)
    for grad in steps:
        p.grad = grad.clone()
        opt.step()
    assert opt.state[p]["postscale_state"].shape == (6, len(widths))
    row_blocks = 2 if "rows" in split else 1

    def blocks(t):
        return [c for r in t.chunk(row_blocks, dim=0) for c in r.split(widths, dim=1)]

    want = _reference_normuon(blocks(start.clone()), [blocks(grad) for grad in steps], lr=0.05, wd=0.1)
    rows = [torch.cat(want[i : i + len(widths)], dim=1) for i in range(0, len(want), len(widths))]
    torch.testing.assert_close(p.detach(), torch.cat(rows, dim=0), rtol=1e-5, atol=1e-6)
