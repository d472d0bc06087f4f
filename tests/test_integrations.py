"""Muon inside ordinary training code: AMP with GradScaler, clipping, compile, schedulers, diagnostics."""

import pytest
import torch
from torch import nn

import muonkit


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def test_amp_gradscaler_clipping_in_the_documented_order():
    """autocast forward -> scaler.scale(loss).backward() -> scaler.unscale_(opt) -> clip -> scaler.step -> update.
    An overflowing step is skipped by the scaler (no NonFiniteGradientError), the next one proceeds."""
    model = _model()
    opt = muonkit.Muon(muonkit.param_groups(model))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    before = [p.detach().clone() for p in model.parameters()]
    for i in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.randn(5, 8)).float().square().mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        if i == 1:
            model[0].weight.grad[0, 0] = float("inf")
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        snapshot = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        changed = any(not torch.equal(a, p) for a, p in zip(snapshot, model.parameters()))
        assert changed == (i != 1)
    assert scaler.get_scale() == 2.0**15
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def _schedule(t):
    """Step t's lr, momentum and weight decay: all three change every step."""
    return {"lr": 0.02 * (1 - t / 10), "momentum": 0.85 + 0.01 * t, "weight_decay": 0.01 * (1 + t / 10)}


def _run_schedules(device, compiled, steps=6, **options):
    """Two copies of ``_model`` on ``device``: one Muon given the schedule as floats, one holding it as 0-d CPU
    tensors filled in place (its step compiled or not), both with ``options``. Returns both models and the graph
    count after each step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    models = [_model().to(device), _model().to(device)]
    floats = muonkit.Muon(muonkit.param_groups(models[0]), nonfinite="ignore", weight_decay=0.01, **options)
    held = muonkit.Muon(muonkit.param_groups(models[1]), nonfinite="ignore", **options,
                        **{k: torch.tensor(v) for k, v in _schedule(0).items()})  # fmt: skip
    step = torch.compile(held.step) if compiled else held.step
    graphs = []
    for t in range(steps):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(t)).to(device)
        for m in models:
            m.zero_grad()
            m(x).square().mean().backward()
        for gf, gh in zip(floats.param_groups, held.param_groups):
            if gf["algorithm"] == "muon":
                for k, v in _schedule(t).items():
                    gf[k] = v
                    gh[k].fill_(v)
        floats.step()
        step()
        graphs.append(counters["stats"]["unique_graphs"])
    return models, graphs


@pytest.mark.slow
def test_a_compiled_step_takes_schedules_held_as_tensors_without_recompiling():
    """lr, momentum and weight decay changed every step, held as 0-d tensors and filled in place: the compiled
    step makes its graphs on the first step and no more (a float schedule of momentum or weight decay recompiles
    every step), and follows the eager run with the same values as floats."""
    (eager_model, compiled_model), graphs = _run_schedules("cpu", compiled=True)
    assert graphs[0] > 0 and len(set(graphs)) == 1, graphs
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_compiled_step_matches_eager():
    eager_model, compiled_model = _model(), _model()
    eager = muonkit.Muon(muonkit.param_groups(eager_model), nonfinite="ignore")
    compiled = muonkit.Muon(muonkit.param_groups(compiled_model), nonfinite="ignore")
    step = torch.compile(compiled.step)
    for t in range(3):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(t))
        for m, o in ((eager_model, eager), (compiled_model, None)):
            m.zero_grad()
            m(x).square().mean().backward()
            if o is not None:
                o.step()
        step()
    for a, b in zip(eager_model.parameters(), compiled_model.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one():
    """param_groups sees through torch.compile's wrapper (same groups), and training matches eager."""
    eager_model, base = _model(), _model()
    compiled_model = torch.compile(base)
    groups_eager = muonkit.param_groups(eager_model)
    groups_compiled = muonkit.param_groups(compiled_model)
    assert [(g["algorithm"], len(g["params"])) for g in groups_eager] == [
        (g["algorithm"], len(g["params"])) for g in groups_compiled
    ]
    eager, compiled = muonkit.Muon(groups_eager), muonkit.Muon(groups_compiled)
    for t in range(3):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(t))
        for m, o in ((eager_model, eager), (compiled_model, compiled)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for a, b in zip(eager_model.parameters(), base.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_diagnostics_without_sync_until_read():
    model = _model()
    opt = muonkit.Muon(muonkit.param_groups(model), diagnostics=True, method="svd")
    with pytest.raises(RuntimeError, match="diagnostics=True"):
        muonkit.Muon(muonkit.param_groups(model)).stats()
    model(torch.randn(64, 8)).square().mean().backward()
    opt.step()
    assert all(isinstance(t, torch.Tensor) for v in opt._stats.values() for ts in v.values() for t in ts)
    stats = opt.stats()
    gi = next(i for i, g in enumerate(opt.param_groups) if g["algorithm"] == "muon")
    # full-rank gradients (batch 64 > width): the exact polar factor is orthogonal
    assert stats[f"group{gi}/orth_error"] < 1e-5
    assert stats[f"group{gi}/lr"] == 0.02 and stats[f"group{gi}/lr_max"] == pytest.approx(0.02 * 2**0.5)
    # the update of a k x n (k <= n) orthogonal matrix has RMS sqrt(k / (k n)) times the scale
    assert stats[f"group{gi}/update_rms"] > 0
    assert stats[f"group{gi}/sigma_max"] == pytest.approx(1.0, abs=1e-4)  # the SVD polar factor
    assert stats[f"group{gi}/sigma_min"] == pytest.approx(1.0, abs=1e-3)
    assert stats[f"group{gi}/epsilon"] < 1e-3 and stats[f"group{gi}/chi"] == pytest.approx(1.0, abs=1e-3)


def _conv_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))


@pytest.mark.parametrize(
    "options",
    [{}, {"nesterov": False, "coefficients": "polar_express", "split": 2}, {"postscale": "normuon"},
     {"conv": True, "method": "svd"}],
    ids=["defaults", "no-nesterov-split", "normuon", "conv-svd"],
)  # fmt: skip
def test_recomputed_stats_are_those_the_diagnostics_step_measured(options):
    """recompute_stats after a step without diagnostics gives what Muon(diagnostics=True).stats() measured in the
    same step (same gradients, buffers and NS options), on steps that already carry momentum; only the row state
    of a normuon postscale moves one step further."""
    options = dict(options)
    conv = options.pop("conv", False)
    twins = [_conv_model(), _conv_model()] if conv else [_model(), _model()]
    opts = [muonkit.Muon(muonkit.param_groups(m), diagnostics=d, **options) for m, d in zip(twins, (True, False))]
    for t in range(3):
        gen = torch.Generator().manual_seed(t)
        x = torch.randn(16, 2, 6, 6, generator=gen) if conv else torch.randn(64, 8, generator=gen)
        for m, o in zip(twins, opts):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    want, got = opts[0].stats(), opts[1].recompute_stats()
    assert set(got) == set(want) and any(k.endswith("/orth_error") for k in got)
    for key, value in want.items():
        if options.get("postscale") == "normuon" and key.endswith(("update_rms", "sigma_max", "sigma_min",
                                                                    "epsilon", "chi", "orth_error")):  # fmt: skip
            assert got[key] == pytest.approx(value, rel=0.05), key
        else:
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert opts[1].diagnostics is False and not opts[1]._stats


def test_recomputed_stats_need_whole_buffers():
    opt = muonkit.Muon(muonkit.param_groups(_model()))
    opt.executor = type("ZeroOne", (), {"shard_state": True, "world_size": 2})()
    with pytest.raises(ValueError, match="diagnostics=True"):
        opt.recompute_stats()


def test_sigma_min_and_epsilon_estimates_report_the_ns_band():
    """Jordan's NS5 leaves singular values in a band below and above 1: the smallest-singular-value estimate sees
    its bottom (from above, within 3%), and epsilon = max |sigma - 1| is Kim & Oh's polar error of the output."""
    from muonkit.optim.stages import _bottom_singular_value, _record_stats, _top_singular_value

    gen = torch.Generator().manual_seed(1)
    G = torch.randn(4, 32, 64, generator=gen, dtype=torch.float64)
    O = muonkit.orthogonalize(G, dtype=torch.float64)
    sv = torch.linalg.svdvals(O)
    est = _bottom_singular_value(O, _top_singular_value(O))
    assert torch.all(est >= sv[:, -1] - 1e-9) and torch.allclose(est, sv[:, -1], rtol=3e-2)
    assert 0.5 < float(est.min()) < 1.0
    stats: dict = {}
    _record_stats(stats, O, 1.0)
    true_eps = float((sv - 1).abs().max())
    assert float(stats["epsilon"][0]) == pytest.approx(true_eps, rel=5e-2)
    rank_deficient = O.clone()
    rank_deficient[:, 0] = 0  # a zero row: a null direction NS leaves at 0
    assert float(_bottom_singular_value(rank_deficient, _top_singular_value(rank_deficient)).max()) < 1e-3


def test_sigma_max_estimate_reports_the_ns_band_edge():
    """Jordan's NS5 leaves singular values in roughly [0.7, 1.2]: the estimate sees the top of that band."""
    from muonkit.optim.stages import _top_singular_value

    gen = torch.Generator().manual_seed(0)
    G = torch.randn(4, 32, 64, generator=gen, dtype=torch.float64)
    O = muonkit.orthogonalize(G, dtype=torch.float64)
    true = torch.linalg.matrix_norm(O, ord=2)
    est = _top_singular_value(O)
    assert torch.all(est <= true + 1e-9) and torch.allclose(est, true, rtol=3e-2)
    assert 1.0 < float(est.max()) < 1.3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (fused step, CUDA graphs)")
@pytest.mark.parametrize("compiled", [False, True])
def test_schedules_held_as_tensors_on_cuda_follow_the_float_schedule(compiled):
    """On CUDA (fused passes, CUDA graphs of repeated steps; or the compiled step), lr, momentum and weight decay
    held as 0-d CPU tensors and filled in place step as the same values given as floats. The compiled step takes
    the torch path and the eager one the fused step, whose bf16 roundings differ (measured on an H200: 4.4e-3
    apart after 6 steps): that pair runs NS in float32, where the two paths agree to rounding."""
    models, _ = _run_schedules("cuda", compiled, ns_dtype=torch.float32 if compiled else None)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, atol=1e-4 if compiled else 2e-3, rtol=0)
