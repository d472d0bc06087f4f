"""Inputs a demanding user will try: dtypes, degenerate shapes, memory formats, extreme scales, late groups,
and property tests of orthogonalize over random shapes and spectra."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import muonkit
from muonkit import Muon, NonFiniteGradientError, orthogonalize
from muonkit import coefficients as C
from muonkit.design import compose


def _step(p, grad=None, **kw):
    opt = Muon([p], **kw)
    p.grad = torch.randn_like(p) if grad is None else grad
    opt.step()
    return opt


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_parameter_dtypes(dtype):
    """Every parameter dtype steps by the right update: on a first step the Nesterov direction is a multiple of the
    gradient, so the update is lr * sqrt(max(1, rows/cols)) * orthogonalize(grad), within the dtype's rounding."""
    p = nn.Parameter((0.05 * torch.randn(8, 6)).clamp(-0.25, 0.25).to(dtype))  # |p| <= 0.25: small ulps
    g = torch.randn(8, 6, dtype=dtype)
    start = p.detach().clone()
    opt = _step(p, g)
    assert p.dtype == dtype and opt.state[p]["momentum_buffer"].dtype == torch.float32
    want = 0.02 * (8 / 6) ** 0.5 * orthogonalize(g.double(), dtype=torch.float64)
    got = start.double() - p.detach().double()
    # the rounding of p - update to the parameter's dtype dominates: at most one ulp of 0.25 (updates are ~0.01)
    atol = {torch.float16: 2**-12, torch.bfloat16: 2**-9, torch.float32: 1e-7, torch.float64: 1e-7}[dtype]
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    assert float((got - want).abs().max()) < 0.5 * float(want.abs().max())  # the update really is this one


@pytest.mark.parametrize("shape", [(1, 50), (50, 1), (1, 65536), (0, 5), (5, 0), (3, 0, 4)])
def test_degenerate_and_extreme_shapes(shape):
    p = nn.Parameter(torch.randn(*shape))
    start = p.detach().clone()
    _step(p, matrix_view="batch" if len(shape) == 3 else "flatten")
    assert torch.isfinite(p).all()
    if p.numel():
        # a rank-1 matrix's polar factor is g / ||g||: the update has unit spectral norm (times Jordan's band)
        delta = (start - p.detach()).reshape(shape[0], -1)
        assert (
            0.5
            < float(torch.linalg.matrix_norm(delta.double(), ord=2)) / 0.02 / max(1, shape[0] / shape[-1]) ** 0.5
            < 1.3
        )


def test_channels_last_conv_and_non_contiguous_parameters():
    conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    w = conv.weight
    assert not w.is_contiguous()
    start = w.detach().clone()
    g = torch.randn_like(w)
    _step(w, g, momentum=0.0, nesterov=False, adjust_lr=None, lr=1.0, ns_dtype=torch.float64, momentum_dtype=None)
    expected = orthogonalize(g.reshape(8, -1).double()).reshape(g.shape).float()
    assert torch.allclose(start - w.detach(), expected, atol=1e-6)
    assert w.is_contiguous(memory_format=torch.channels_last)
    p = nn.Parameter(torch.randn(6, 10).t())  # a transposed view
    assert not p.is_contiguous()
    _step(p)
    assert torch.isfinite(p).all()


@pytest.mark.parametrize(
    "dtype, scale", [(torch.bfloat16, 1e30), (torch.bfloat16, 1e-30), (torch.float16, 1e4), (torch.float16, 1e-6)]
)
def test_huge_and_tiny_gradients_in_half_precision(dtype, scale):
    p = nn.Parameter(torch.randn(16, 8, dtype=dtype))
    g = (torch.randn(16, 8) / 4 * scale).to(dtype)
    assert torch.isfinite(g).all()
    _step(p, g, ns_dtype=dtype)
    assert torch.isfinite(p).all()


def test_overflowing_gradient_is_caught_not_applied():
    p = nn.Parameter(torch.randn(8, 8, dtype=torch.float16))
    start = p.detach().clone()
    with pytest.raises(NonFiniteGradientError):
        _step(p, torch.full((8, 8), 7e4).to(torch.float16))  # inf in fp16
    assert torch.equal(p, start)


def test_add_param_group_later_and_params_without_grad():
    a, b, c = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(5, 5))
    opt = Muon([a], adamw_lr=1e-3)
    opt.add_param_group({"params": [b], "algorithm": "adamw"})
    opt.add_param_group({"params": [c]})
    a.grad, b.grad = torch.randn(4, 4), torch.randn(3)
    c_start = c.detach().clone()
    opt.step()
    assert opt.param_groups[1]["lr"] == 1e-3 and "exp_avg" in opt.state[b]
    assert torch.equal(c, c_start) and c not in opt.state
    with pytest.raises(ValueError, match="param_groups"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3))]})


def test_same_seed_same_result_on_cpu():
    def run():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        opt = Muon(muonkit.param_groups(model))
        for _ in range(3):
            loss = model(torch.randn(5, 8)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(), run()))


# ----------------------------------------------------------------------------- properties of orthogonalize

dims = st.integers(min_value=1, max_value=24)


@settings(max_examples=40, deadline=None)
@given(m=dims, n=dims, seed=st.integers(0, 2**16), log_scale=st.floats(-20, 20))
def test_scale_invariance_and_transpose(m, n, seed, log_scale):
    G = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    O = orthogonalize(G, eps=0.0)
    assert torch.allclose(orthogonalize(G * 10.0**log_scale, eps=0.0), O, atol=1e-9)
    assert torch.allclose(orthogonalize(G.T.contiguous(), eps=0.0), O.T, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(2, 20),
    extra=st.integers(0, 20),
    cond=st.floats(1.0, 50.0),
    name=st.sampled_from(["jordan", "polar_express", "you", "fixed_point_quintic", "taylor_5"]),
    seed=st.integers(0, 2**16),
)
def test_singular_values_lie_in_the_presets_band(m, extra, cond, name, seed):
    """For a random spectrum in [1/cond, 1], every output singular value lies in the band that the scalar map
    gives on the normalised spectrum's range (float64)."""
    n = m + extra
    rng = np.random.default_rng(seed)
    sig = np.sort(rng.uniform(1 / cond, 1.0, m))
    sig[-1] = 1.0
    U, _ = np.linalg.qr(rng.standard_normal((n, m)))
    V, _ = np.linalg.qr(rng.standard_normal((m, m)))
    G = torch.from_numpy((U * sig) @ V.T)
    preset = C.get(name)
    O = orthogonalize(G, name, eps=0.0)
    x = sig / (preset.norm_scale * np.linalg.norm(sig))
    # the grid holds the spectrum itself: each s_i is phi(x_i) up to rounding, and the band's edge may lie between
    # grid points nearer some x_i (hypothesis found an s_i 1.4e-9 below a plain 20001-point grid's minimum)
    phi = compose(preset.schedule(), np.concatenate([np.linspace(x.min(), x.max(), 20001), x]))
    s = torch.linalg.svdvals(O).numpy()
    assert s.min() >= phi.min() - 1e-9 and s.max() <= phi.max() + 1e-9


def test_finite_check_handles_empty_mixed_dtypes_and_huge_values():
    from muonkit.optim.stages import all_finite as _all_finite

    ts = [
        torch.zeros(0, 3),
        torch.full((4,), 1e30, dtype=torch.bfloat16),  # a 2-norm would overflow; the max does not
        torch.tensor([1.0, float("nan")]),
        torch.tensor([float("-inf")], dtype=torch.float16),
        torch.ones(2, 2, dtype=torch.float64),
    ]
    assert _all_finite(ts).tolist() == [True, True, False, False, True]
