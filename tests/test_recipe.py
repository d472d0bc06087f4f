"""The training recipe of the demo's comparison: schedules, weight decay per optimizer, clipping, resume."""

import itertools
import json
import math

import pytest
import torch

import muonkit
from muonkit import Muon
from muonkit.cli import main
from muonkit.train import SIZES, LMTask, builtin_corpus, make_optimizer, train_one
from muonkit.train.model import GPT
from muonkit.train.recipe import Recipe, Schedule

TINY = SIZES["tiny"]


@pytest.fixture(scope="module")
def task():
    return LMTask(builtin_corpus(), TINY, batch_size=4, eval_batches=2)


def test_cosine_warms_up_linearly_then_decays_to_the_floor():
    r = Recipe(warmup=10, floor=0.1)
    assert [r.lr_factor(s, 100) for s in (1, 5, 10)] == [0.1, 0.5, 1.0]
    assert r.lr_factor(100, 100) == pytest.approx(0.1)
    assert r.lr_factor(55, 100) == pytest.approx(0.55)  # halfway through the decay: the mean of peak and floor
    factors = [r.lr_factor(s, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(factors))


def test_wsd_holds_the_peak_then_decays_linearly_over_the_last_fraction():
    r = Recipe(schedule="wsd", warmup=10, floor=0.0, decay=0.2)
    assert all(r.lr_factor(s, 100) == 1.0 for s in range(10, 81))
    assert r.lr_factor(90, 100) == pytest.approx(0.5)
    assert r.lr_factor(100, 100) == 0.0


def test_constant_and_the_default_warmup_of_five_percent():
    r = Recipe(schedule="constant")
    assert r.warmup_steps(300) == 15 and r.lr_factor(15, 300) == 1.0 and r.lr_factor(300, 300) == 1.0
    assert r.lr_factor(3, 300) == pytest.approx(0.2)
    assert Recipe(schedule="constant", warmup=0).lr_factor(1, 10) == 1.0  # no warmup: the first step at the peak


@pytest.mark.parametrize(
    "kwargs, words",
    [({"schedule": "linear"}, "schedule"), ({"warmup": -1}, "warmup"), ({"floor": 1.5}, "floor"),
     ({"decay": 0}, "decay"), ({"weight_decay": {"adamw": math.nan}}, "weight decay"), ({"clip": 0}, "clip")],
)  # fmt: skip
def test_bad_recipes_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        Recipe(**kwargs)


def test_each_optimizer_gets_its_own_standard_weight_decay():
    r = Recipe(weight_decay={"muon": 0.05})
    assert r.decay_for("muon") == 0.05 and r.decay_for("adamw") == 0.1 and r.decay_for("sgd") == 0.0
    model = GPT(TINY)
    adamw = make_optimizer("adamw", model, {"adamw": 1e-3}, weight_decay=0.1)
    decayed = {id(p) for g in adamw.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    assert decayed == {id(p) for p in model.parameters() if p.ndim >= 2}  # gains and biases undecayed
    muon = make_optimizer("muon", model, {"muon": 0.02, "adamw": 1e-3}, weight_decay=0.01)
    assert isinstance(muon, Muon) and {g["weight_decay"] for g in muon.param_groups} == {0.01}
    cwd = make_optimizer("muon_cwd", model, {"muon_cwd": 0.02, "adamw": 1e-3}, weight_decay=0.01)
    assert {g["update"] for g in cwd.param_groups if g["algorithm"] == "muon"} == {"cautious"}
    assert r.decay_for("muon_cwd") == 0.01
    heads = make_optimizer("muon_heads", model, {"muon_heads": 0.02, "adamw": 1e-3}, split_qkv=True)
    splits = {n: g["split"] for g in heads.param_groups for n in g.get("param_names", ()) if g["algorithm"] == "muon"}
    assert splits["blocks.0.attn.qkv.weight"] == 3 * TINY.n_head  # q, k, v of each head: its own NS
    assert splits["blocks.0.attn.proj.weight"] is None
    heads_o = make_optimizer("muon_heads_o", model, {"muon_heads_o": 0.02, "adamw": 1e-3}, split_qkv=True)
    splits = {n: g["split"] for g in heads_o.param_groups for n in g.get("param_names", ()) if g["algorithm"] == "muon"}
    assert splits["blocks.0.attn.qkv.weight"] == 3 * TINY.n_head
    assert splits["blocks.0.attn.proj.weight"] == {"cols": TINY.n_head}  # the output projection per head too
    nor = make_optimizer("normuon", model, {"normuon": 0.02, "adamw": 1e-3}, weight_decay=0.01)
    assert {g["postscale"] for g in nor.param_groups if g["algorithm"] == "muon"} == {"normuon"}
    aol = make_optimizer("muon_aol", model, {"muon_aol": 0.02, "adamw": 1e-3}, weight_decay=0.01)
    assert {(g["precondition"], g["ns_steps"]) for g in aol.param_groups if g["algorithm"] == "muon"} == {("aol", 4)}
    assert r.decay_for("normuon") == r.decay_for("muon_aol") == 0.01
    for name, stage in (("muon_eq", "row_norm"), ("muon_cans", "schatten4")):
        pre = make_optimizer(name, model, {name: 0.02, "adamw": 1e-3}, weight_decay=0.01)
        muon_groups = [g for g in pre.param_groups if g["algorithm"] == "muon"]
        assert {(g["precondition"], g["ns_steps"]) for g in muon_groups} == {(stage, 5)}
        assert r.decay_for(name) == 0.01


def test_a_run_follows_the_schedule_and_clips(task, monkeypatch):
    seen = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        seen.append(max_norm)
        return clip(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    recipe = Recipe(warmup=2, floor=0.25, clip=0.5)
    train_one(task, "adamw", steps=8, eval_every=8, recipe=recipe)
    assert seen == [0.5] * 8
    model = GPT(TINY)
    opt = make_optimizer("adamw", model, {"adamw": 1e-3})
    schedule = Schedule(opt, recipe, 8)
    schedule.set(8)
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-4)
    schedule.set(1)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_a_run_with_the_recipe_resumes_on_the_same_trajectory(task, tmp_path):
    recipe = Recipe(warmup=3)
    full = train_one(task, "muon", steps=12, eval_every=4, recipe=recipe)
    flat = train_one(task, "muon", steps=12, eval_every=4)
    assert full.train_loss != flat.train_loss  # the recipe changes the run

    calls = [0]

    def interrupt(result):  # called after every step
        calls[0] += 1
        if calls[0] == 7:
            raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        train_one(task, "muon", steps=12, eval_every=4, checkpoint=ckpt, on_step=interrupt, recipe=recipe)
    state = torch.load(ckpt, weights_only=False)
    resumed = train_one(task, "muon", steps=12, eval_every=4, checkpoint=ckpt, resume=state, recipe=recipe)
    assert resumed.train_loss == full.train_loss and resumed.val_loss == full.val_loss


def test_the_demo_prints_and_stores_its_recipe(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["demo", "--quick", "--no-progress", "--out", str(out), "--schedule", "wsd", "--warmup", "4",
            "--weight-decay", "adamw=0.05", "--clip", "0"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "warmup 4 steps, constant, linear decay to 0.1x" in text and "adamw 0.05" in text
    assert "no clipping" in text
    recipe = json.loads((out / "results.json").read_text())["config"]["recipe"]
    assert recipe == {**Recipe().to_dict(), "schedule": "wsd", "warmup": 4, "weight_decay": {"adamw": 0.05},
                      "clip": None}  # fmt: skip
    assert main(["demo", "--resume", str(out), "--no-progress", "--schedule", "cosine"]) == 2
    assert "contradict" in capsys.readouterr().err


def _comp(**over):
    comp = {"subject": "muon", "reference": "adamw", "reference_steps": 300, "target_val_loss": 2.3,
            "subject_final_val_loss": 2.1, "subject_final_step": 300, "subject_steps_to_target": 150,
            "step_ratio": 0.5, "time_ratio": 0.62}  # fmt: skip
    return {**comp, **over}


def test_the_result_line_states_both_losses_and_both_ratios_with_the_seed_count():
    from muonkit.train.report import result_line

    line = result_line(_comp())
    assert line == ("Muon vs AdamW (1 seed): validation loss after 300 steps 2.100 vs 2.300; Muon reached AdamW's "
                    "final validation loss in 0.50x the steps and 0.62x the wall-clock.")  # fmt: skip
    slower = result_line(_comp(subject_final_val_loss=2.4, subject_steps_to_target=None))
    assert "(1 seed)" in slower and "2.400 vs 2.300" in slower and "did not reach" in slower


def test_several_seeds_pair_each_run_with_the_same_seed_and_report_means_and_spreads():
    from muonkit.train import RunResult
    from muonkit.train.report import comparison, format_table, result_line

    def run(name, losses):
        return RunResult(name, 0.1, 4, eval_steps=[0, 2, 4], eval_wall=[0.0, 1.0, 2.0],
                         metrics={"val_loss": losses}, train_loss=[1.0], train_seconds=2.0)  # fmt: skip

    results = {
        "muon/seed0": run("muon", [3.0, 2.0, 1.5]), "muon/seed1": run("muon", [3.0, 2.6, 2.2]),
        "adamw/seed0": run("adamw", [3.0, 2.5, 2.0]), "adamw/seed1": run("adamw", [3.0, 2.5, 2.1]),
    }  # fmt: skip
    comp = comparison(results)
    assert comp["seeds"] == 2 and comp["reached"] == 1  # seed 1's Muon never reached its own AdamW's 2.1
    assert comp["subject_final_val_loss"] == pytest.approx(1.85) and comp["target_val_loss"] == pytest.approx(2.05)
    assert comp["step_ratio"] == 0.5 and comp["step_ratio_range"] == [0.5, 0.5]
    line = result_line(comp)
    assert "(2 seeds, mean ± sd)" in line and "1.850 ± 0.495 vs 2.050 ± 0.071" in line and "in 1 of 2 seeds" in line
    table = format_table(results).splitlines()
    assert "2 (0.50x)" in table[2] and "not reached" in table[3]  # each row against its own seed's AdamW


def test_the_demo_runs_several_seeds(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["demo", "--quick", "--no-progress", "--out", str(out), "--seeds", "2", "--steps", "6"]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert sorted(saved["runs"]) == ["adamw/seed0", "adamw/seed1", "muon/seed0", "muon/seed1"]
    assert saved["comparison"]["seeds"] == 2 and "(2 seeds, mean ± sd)" in capsys.readouterr().out
    first = saved["runs"]["muon/seed0"]["train_loss"]
    assert first != saved["runs"]["muon/seed1"]["train_loss"]  # another initialisation and batch order
    single = tmp_path / "single"
    assert main(["demo", "--quick", "--no-progress", "--out", str(single), "--steps", "6"]) == 0
    assert json.loads((single / "results.json").read_text())["runs"]["muon"]["train_loss"] == first


def test_momentum_warmup_raises_muons_momentum_and_leaves_adamw_alone():
    r = Recipe(momentum_warmup=4, momentum_start=0.85)
    assert [r.momentum(s, 0.95) for s in (1, 3, 5, 9)] == pytest.approx([0.85, 0.9, 0.95, 0.95])
    assert Recipe().momentum(1, 0.95) == 0.95  # off by default
    with pytest.raises(ValueError, match="momentum_warmup"):
        Recipe(momentum_warmup=-1)
    with pytest.raises(ValueError, match="momentum_start"):
        Recipe(momentum_start=1.0)
    model = GPT(TINY)
    opt = make_optimizer("muon", model, {"muon": 0.02, "adamw": 1e-3})
    schedule = Schedule(opt, r, 20)
    schedule.set(1)
    by_algorithm = {g["algorithm"]: g for g in opt.param_groups}
    assert by_algorithm["muon"]["momentum"] == pytest.approx(0.85) and "momentum" not in by_algorithm["adamw"]
    schedule.set(20)
    assert by_algorithm["muon"]["momentum"] == 0.95
    assert "Muon momentum from 0.85 over 4 steps" in r.describe(20, ["muon"])


def test_muon_mw_warms_its_momentum_up_over_a_sixth_of_the_run_and_plain_muon_does_not():
    """The optimizer ``muon_mw``: without a recipe-wide momentum warmup, its Muon groups' momentum rises from 0.85 over
    the first sixth of the run (5 of 30 steps); plain Muon's stays; a recipe-wide warmup applies to both alike."""
    r = Recipe()
    assert (r.momentum_warmup_for("muon_mw", 30), r.momentum_warmup_for("muon", 30)) == (5, 0)
    assert r.momentum_warmup_for("muon_mw", 2) == 1
    assert Recipe(momentum_warmup=7).momentum_warmup_for("muon_mw", 30) == 7
    momenta = {}
    for name in ("muon", "muon_mw"):
        opt = make_optimizer(name, GPT(TINY), {name: 0.02, "adamw": 1e-3})
        schedule = Schedule(opt, r, 30, name)
        muon_group = next(g for g in opt.param_groups if g["algorithm"] == "muon")
        momenta[name] = []
        for step in (1, 3, 6, 30):
            schedule.set(step)
            momenta[name].append(muon_group["momentum"])
    assert momenta["muon"] == [0.95] * 4
    assert momenta["muon_mw"] == pytest.approx([0.85, 0.89, 0.95, 0.95])
    assert "muon_mw momentum from 0.85 over 5 steps" in r.describe(30, ["muon", "muon_mw"])
    assert "momentum" not in r.describe(30, ["muon", "adamw"])


def test_the_schedule_fills_values_held_as_tensors_in_place():
    """A group holding lr and momentum as tensors (for a step under torch.compile) keeps the same tensor objects:
    the schedule writes into them."""
    model = GPT(TINY)
    opt = Muon(muonkit.param_groups(model), lr=torch.tensor(0.02), momentum=torch.tensor(0.95), adamw_lr=1e-3)
    held = [(g["lr"], g.get("momentum")) for g in opt.param_groups]
    recipe = Recipe(warmup=2, momentum_warmup=4)
    Schedule(opt, recipe, 20).set(1)
    for g, (lr, momentum) in zip(opt.param_groups, held):
        peak = 0.02 if g["algorithm"] == "muon" else 1e-3  # the AdamW groups' lr (adamw_lr) is a float
        assert (g["lr"] is lr) == isinstance(lr, torch.Tensor)
        assert float(g["lr"]) == pytest.approx(peak * recipe.lr_factor(1, 20))
        if g["algorithm"] == "muon":
            assert g["momentum"] is momentum and float(momentum) == pytest.approx(0.85)


def test_the_demo_takes_a_momentum_warmup(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["demo", "--quick", "--no-progress", "--out", str(out), "--momentum-warmup", "10", "--steps", "4"]) == 0
    assert json.loads((out / "results.json").read_text())["config"]["recipe"]["momentum_warmup"] == 10
    assert "Muon momentum from 0.85 over 10 steps" in capsys.readouterr().out
