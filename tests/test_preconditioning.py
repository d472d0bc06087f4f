"""Pre-conditioning stages before NS (``precondition="aol"`` from Turbo-Muon, ``"schatten4"`` from CANS,
``"row_norm"`` from MuonEq): batched forms against their per-entry references, the spectral bounds, and the whole
step against a transcription."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import assert_cuda_steps_match_cpu, matrix_with_spectrum
from muonkit import Muon
from muonkit.coefficients import as_preset
from muonkit.optim import pipeline


@pytest.mark.parametrize("name", ["aol", "schatten4", "row_norm"])
@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (7, 7)])
def test_fast_stage_equals_its_reference(name, shape):
    stage = pipeline.get_stage("precondition", name)
    X = torch.randn(3, *shape, generator=torch.Generator().manual_seed(5))
    out = stage.fast(X)
    assert out.shape == X.shape
    for i in range(3):
        torch.testing.assert_close(out[i].double(), stage.reference(X[i]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32)])
def test_normalising_stages_bound_the_spectral_norm_and_row_norm_makes_unit_rows(shape):
    m, n = shape
    for sigmas in ([1.0] * min(m, n), torch.logspace(-5, 2, min(m, n)).tolist()):
        X = matrix_with_spectrum(m, n, sigmas, seed=3, dtype=torch.float32)
        for W in (pipeline.aol(X), pipeline.schatten4(X)):
            assert torch.linalg.matrix_norm(W.double(), ord=2) <= 1 + 1e-5
        R = pipeline.row_normalise(X)
        torch.testing.assert_close(R.norm(dim=-1), torch.ones(m), rtol=1e-5, atol=0)
    assert pipeline.get_stage("precondition", "aol").normalises
    assert pipeline.get_stage("precondition", "schatten4").normalises
    assert not pipeline.get_stage("precondition", "row_norm").normalises


@pytest.mark.parametrize("name", ["aol", "schatten4"])
def test_stage_lifts_at_least_as_many_small_singular_values_as_frobenius_normalisation(name):
    """What Turbo-Muon's rescaling and CANS's Schatten-4 normalisation buy: from a decaying spectrum, after each
    of the first steps of Jordan's NS at least as many singular values are in the band (>= 0.5) as after the
    Frobenius normalisation, and more after some (``benchmarks/precondition.py`` measures the steps saved)."""
    G = matrix_with_spectrum(32, 96, torch.logspace(-3, 0, 32).tolist(), seed=1)
    lifted = {}
    for stage in ("none", name):
        X = G / G.norm() if stage == "none" else pipeline.get_stage("precondition", name).fast(G).double()
        counts = []
        for a, b, c in as_preset("jordan").schedule(5):
            A = X @ X.mT
            X = a * X + (b * A + c * A @ A) @ X
            counts.append(int((torch.linalg.svdvals(X) >= 0.5).sum()))
        lifted[stage] = counts
    assert all(x >= y for x, y in zip(lifted[name], lifted["none"])) and lifted[name] != lifted["none"]


def _reference_step(p, g, buf, precondition, lr=0.05, momentum=0.95, steps=5):
    """Momentum, Nesterov blend, the stage on the wide orientation in place of the Frobenius normalisation (AOL's
    row scales, or the Schatten-4 norm), Jordan's NS in float32 without normalising again, the shape scale, the
    update: written out for one 2-D parameter."""
    buf.lerp_(g, 1 - momentum)
    u = g.lerp(buf, momentum)
    tall = u.shape[0] > u.shape[1]
    X = u.T if tall else u
    aol = precondition == "aol"
    X = X * (X @ X.T).abs().sum(dim=1).rsqrt()[:, None] if aol else X / (X @ X.T).norm() ** 0.5
    for a, b, c in as_preset("jordan").schedule(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    O = X.T if tall else X
    p.sub_(lr * max(1.0, p.shape[0] / p.shape[1]) ** 0.5 * O)


@pytest.mark.parametrize(("precondition", "steps"), [("aol", 4), ("schatten4", 5)])
def test_muon_with_a_normalising_stage_equals_the_reference_step(precondition, steps):
    g = torch.Generator().manual_seed(2)
    shapes = [(12, 8), (8, 20)]
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    params = [nn.Parameter(p.clone()) for p in start]
    opt = Muon(params, lr=0.05, precondition=precondition, ns_steps=steps, method="newton_schulz")
    for step in grads:
        for p, gr in zip(params, step):
            p.grad = gr.clone()
        opt.step()
    ref = [p.clone() for p in start]
    bufs = [torch.zeros_like(p) for p in start]
    for step in grads:
        for p, gr, b in zip(ref, step, bufs):
            _reference_step(p, gr, b, precondition, steps=steps)
    for got, want in zip(params, ref):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("precondition", "nesterov"), [("row_norm", True), ("aol", False), ("schatten4", True)])
@pytest.mark.parametrize(("ns_dtype", "atol"), [(torch.float32, 2e-5), (torch.bfloat16, 5e-3)])
def test_the_fused_step_runs_each_precondition_stage_as_the_torch_path_does(
    precondition, nesterov, ns_dtype, atol, monkeypatch
):
    """The fused step (Triton's interpreter on CPU tensors; compiled on CUDA) applies the stage to its NS input in
    place (``Stage.in_place``) and normalises again as the torch path does: the same three steps, for wide, tall
    and square matrices, two of one shape in one batch, beside a group without the stage. In bfloat16 the fused
    step hands NS its divisors instead of dividing (``orthogonalize_filled(unnormalised=True)``); the two paths
    then round differently, by up to 2.3e-3 on these matrices without any stage as well."""
    pytest.importorskip("triton")
    import os

    from muonkit.optim import functional, plans, remembered

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("no CUDA and Triton's interpreter is off")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(5)
    shapes = [(6, 10), (10, 6), (7, 7), (6, 10)]
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    opts = dict(lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.1, coefficients="jordan", ns_steps=5,
                adjust_lr="original", eps=1e-7, ns_dtype=ns_dtype, method="newton_schulz")  # fmt: skip
    stage_opts = {**opts, "precondition": precondition}
    results, ran = {}, []
    real = plans._StepPlan.run  # every fused step runs a plan
    monkeypatch.setattr(plans._StepPlan, "run", lambda self, *a: ran.append(1) or real(self, *a))
    for fused_path in (False, True):  # on CUDA the fused path is the default: the torch path is asked for too
        monkeypatch.setattr(functional, "_fused_step_applies", lambda *a, use=fused_path: use)
        monkeypatch.setattr(remembered, "_REMEMBERED", [])  # no plan remembered from another test runs instead
        ps = [p.clone().to(device) for p in start]
        bufs = [torch.zeros_like(p) for p in ps]
        for step in grads:
            gs = [gr.to(device) for gr in step]
            functional.muon_steps([(ps[:3], gs[:3], bufs[:3], stage_opts), (ps[3:], gs[3:], bufs[3:], opts)])
        results[fused_path] = [p.cpu() for p in ps]
        assert len(ran) == (3 if fused_path else 0)  # the torch path first, then the fused one
    for a, b in zip(results[False], results[True]):
        torch.testing.assert_close(b, a, rtol=0, atol=atol)
    moved = [p.cpu() for p in start]
    assert all((a - m).abs().max() > 1e-2 for a, m in zip(results[True], moved))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "options",
    [{"precondition": "aol", "ns_steps": 4}, {"precondition": "schatten4"}, {"precondition": "row_norm"},
     {"postscale": "normuon"}],
)  # fmt: skip
def test_stages_on_cuda_match_the_cpu_step(options):
    """The paths these stages take on CUDA (the fused step for the precondition stages, NS graphs and the torch path
    for NorMuon) give the CPU's steps."""
    assert_cuda_steps_match_cpu([(64, 32), (32, 96), (48, 48)], **options)
