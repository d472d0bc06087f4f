"""The step pipeline's slots and registry (``muonkit.optim.pipeline``): a stage registered in a slot is an option
of every group, checked like the others, saved with the group, and its fast form agrees with its reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import stage_examples
from muonkit import Muon
from muonkit.optim import pipeline


def test_each_slot_has_its_default_and_the_defaults_are_the_fused_ones():
    assert pipeline.SLOTS == {"precondition": "none", "postscale": "none", "update": "decoupled"}
    for slot, name in pipeline.SLOTS.items():
        assert pipeline.get_stage(slot, name).fused
    names = stage_examples.register()
    assert not pipeline.fused_stages(names)
    assert pipeline.fused_stages({}) and pipeline.fused_stages(dict(pipeline.SLOTS))


def test_registering_refuses_unknown_slots_taken_names_and_removing_defaults():
    stage_examples.register()
    noop = pipeline.Stage("postscale", "x", lambda O: O, lambda O: O, "")
    with pytest.raises(ValueError, match="unknown slot"):
        pipeline.register(pipeline.Stage("momentum", "x", noop.fast, noop.reference, ""))
    with pytest.raises(ValueError, match="already registered"):
        pipeline.register(pipeline.Stage("postscale", stage_examples.POSTSCALE, noop.fast, noop.reference, ""))
    with pytest.raises(ValueError, match="non-empty string"):
        pipeline.register(pipeline.Stage("postscale", "", noop.fast, noop.reference, ""))
    with pytest.raises(ValueError, match="cannot be removed"):
        pipeline.unregister("update", "decoupled")
    with pytest.raises(ValueError, match="runs an added stage through its in_place form"):
        pipeline.register(pipeline.Stage("postscale", "y", noop.fast, noop.reference, "", fused=True))
    with pytest.raises(ValueError, match="only precondition stages have an in_place form"):
        pipeline.register(pipeline.Stage("postscale", "y", noop.fast, noop.reference, "", in_place=lambda X: None))
    assert not pipeline.fused_stages({"postscale": "normuon"})  # built in, without a fused form
    assert all(pipeline.fused_stages({"precondition": name}) for name in ("row_norm", "aol", "schatten4"))
    with pytest.raises(ValueError, match=r"postscale must be one of \('none'"):
        pipeline.get_stage("postscale", "nope")


def test_a_stage_registered_after_import_is_an_option_and_leaves_with_unregister():
    name = "test_later"
    with pytest.raises(ValueError, match="postscale must be one of"):
        Muon([nn.Parameter(torch.zeros(4, 4))], postscale=name)
    pipeline.register(pipeline.Stage("postscale", name, lambda O: 2 * O, lambda O: 2 * O, "a test"))
    try:
        Muon([nn.Parameter(torch.zeros(4, 4))], postscale=name)
    finally:
        pipeline.unregister("postscale", name)
    with pytest.raises(ValueError, match="postscale must be one of"):
        Muon([nn.Parameter(torch.zeros(4, 4))], postscale=name)


def test_the_default_update_stage_agrees_with_its_reference():
    stage = pipeline.get_stage("update", "decoupled")
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    updates = [torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    ref = [p.clone() for p in params]
    stage.fast(params, updates, 0.1, 0.3)
    for p, u in zip(ref, updates):
        stage.reference(p, u, 0.1, 0.3)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-15)


@pytest.mark.parametrize("slot", ["precondition", "postscale"])
def test_the_example_matrix_stages_agree_with_their_references_per_matrix(slot):
    stage = pipeline.get_stage(slot, stage_examples.register()[slot])
    X = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = stage.fast(X)
    for x, g in zip(X, got):
        torch.testing.assert_close(g, stage.reference(x), rtol=0, atol=1e-14)


def _model_and_groups(stages: dict[str, str]):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.Linear(8, 8, bias=False), nn.Linear(8, 4, bias=False))
    groups = [{"params": [model[0].weight, model[2].weight]}, {"params": [model[1].weight], **stages}]
    return model, groups


def _steps(model, opt, n):
    for t in range(n):
        gen = torch.Generator().manual_seed(t)
        opt.zero_grad()
        model(torch.randn(16, 6, generator=gen)).square().mean().backward()
        opt.step()


def test_a_group_chooses_its_stages_and_they_survive_a_state_dict_round_trip():
    """One group with the example stages, one without; resumed from a state_dict the trajectory is bitwise the
    same, and the stages changed the trajectory."""
    names = stage_examples.register()
    model, groups = _model_and_groups(names)
    opt = Muon(groups, lr=0.05, weight_decay=0.2)
    _steps(model, opt, 2)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})  # later steps change the live state
    assert all(saved["opt"]["param_groups"][1][slot] == name for slot, name in names.items())
    assert saved["opt"]["param_groups"][0]["postscale"] == "none"
    _steps(model, opt, 2)
    model2, groups2 = _model_and_groups({})  # the stages come back from the state_dict
    model2.load_state_dict(saved["model"])
    opt2 = Muon(groups2, lr=0.05, weight_decay=0.2)
    opt2.load_state_dict(saved["opt"])
    _steps(model2, opt2, 2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    plain, plain_groups = _model_and_groups({})  # the same data without the stages: another trajectory
    plain_opt = Muon(plain_groups, lr=0.05, weight_decay=0.2)
    _steps(plain, plain_opt, 2)
    _steps(plain, plain_opt, 2)
    assert not torch.allclose(plain[1].weight, model[1].weight, atol=1e-4)


def test_a_state_dict_naming_a_stage_this_process_lacks_is_refused_whole():
    names = stage_examples.register()
    model, groups = _model_and_groups(names)
    opt = Muon(groups)
    _steps(model, opt, 1)
    sd = opt.state_dict()
    sd["param_groups"][1]["postscale"] = "not_registered_here"
    before = {k: v.clone() for k, v in opt.state_dict()["state"][2].items()}
    with pytest.raises(ValueError, match="postscale must be one of"):
        opt.load_state_dict(sd)
    assert opt.param_groups[1]["postscale"] == stage_examples.POSTSCALE
    assert all(torch.equal(opt.state_dict()["state"][2][k], v) for k, v in before.items())


def test_cautious_weight_decay_decays_only_where_update_and_weight_agree_in_sign():
    """The built-in ``update="cautious"`` stage (arXiv 2510.12402, Algorithm 1) against its entrywise reference,
    and against plain decoupled decay on the entries where the signs agree."""
    stage = pipeline.get_stage("update", "cautious")
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(5, 7, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)]
    updates = [0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    updates[0][0, 0] = 0.0  # a zero update decays (u x >= 0)
    fast, ref = [p.clone() for p in params], [p.clone() for p in params]
    given = [u.clone() for u in updates]
    stage.fast(fast, updates, 0.1, 0.5)
    assert all(torch.equal(u, g) for u, g in zip(updates, given))  # the updates are left as they were
    for p, u in zip(ref, updates):
        stage.reference(p, u, 0.1, 0.5)
    for f, r, p, u in zip(fast, ref, params, updates):
        torch.testing.assert_close(f, r, rtol=0, atol=1e-15)
        agree = u * p >= 0
        torch.testing.assert_close(f[agree], (p * (1 - 0.05) - u)[agree], rtol=0, atol=1e-15)
        torch.testing.assert_close(f[~agree], (p - u)[~agree], rtol=0, atol=1e-15)
    assert fast[0][0, 0] == pytest.approx(float(params[0][0, 0]) * 0.95, abs=1e-15)  # decayed, nothing subtracted
