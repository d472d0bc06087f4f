"""muonkit train --sweep: a small lr sweep on the user's task, widened until its best lies inside the grid."""

import json
import math

import pytest

from muonkit.cli import main
from muonkit.train import SIZES, LMTask, RunResult, builtin_corpus
from muonkit.train import sweep as sweep_mod
from muonkit.train.sweep import on_edge, sweep_lrs


def _fake_train(best: dict[str, float], seen: list):
    """A stand-in for train_one whose final loss is a parabola in log(lr), lowest at ``best[name]``."""

    def train_one(task, name, *, steps, eval_every, seed, lrs, recipe):
        seen.append((name, dict(lrs)))
        loss = 1.0 + (math.log2(lrs[name]) - math.log2(best[name])) ** 2
        return RunResult(name, lrs[name], steps, eval_steps=[steps], eval_wall=[1.0], metrics={"val_loss": [loss]})

    return train_one


@pytest.fixture(scope="module")
def task():
    return LMTask(builtin_corpus(), SIZES["tiny"], batch_size=2, eval_batches=1)


def test_the_sweep_widens_past_an_edge_until_the_best_is_inside(task, monkeypatch):
    seen = []
    monkeypatch.setattr(sweep_mod, "train_one", _fake_train({"adamw": 2e-3, "muon": 0.16}, seen))
    chosen, table = sweep_lrs(task, ["muon", "adamw"], steps=5, lrs={"adamw": 1e-3, "muon": 0.04})
    assert chosen == {"adamw": 2e-3, "muon": 0.16}
    assert [r["lr"] for r in table["adamw"]] == [5e-4, 1e-3, 2e-3, 4e-3]  # 2e-3 was the top edge: one more
    assert [r["lr"] for r in table["muon"]] == [0.02, 0.04, 0.08, 0.16, 0.32]  # two more
    assert not on_edge(table["adamw"]) and not on_edge(table["muon"])
    assert seen[0][0] == "adamw"  # AdamW first: Muon's AdamW part then takes its chosen lr
    assert all(lrs["adamw"] == 2e-3 for name, lrs in seen if name == "muon")


def test_a_best_beyond_the_extensions_is_reported_on_the_edge(task, monkeypatch):
    monkeypatch.setattr(sweep_mod, "train_one", _fake_train({"adamw": 1.0}, []))
    chosen, table = sweep_lrs(task, ["adamw"], steps=5, lrs={"adamw": 1e-3})
    assert chosen["adamw"] == 8e-3 and on_edge(table["adamw"])  # 2e-3, then 4e-3, 8e-3: still the top


def test_train_sweep_runs_the_comparison_at_the_chosen_lrs(tmp_path, monkeypatch, capsys):
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(builtin_corpus().train[:30_000].tolist()))
    out = tmp_path / "run"
    argv = ["train", "--data", str(text), "--size", "tiny", "--steps", "3", "--batch-size", "2", "--sweep",
            "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    saved = json.loads((out / "results.json").read_text())
    swept = saved["config"]["sweep_results"]
    assert set(swept) == {"muon", "adamw"} and all(len(rows) >= 3 for rows in swept.values())
    for name, rows in swept.items():
        best = min(rows, key=lambda r: r["final_val_loss"])
        assert best["chosen"] and saved["config"]["lrs"][name] == best["lr"] == saved["runs"][name]["lr"]
    assert "sweeping learning rates" in capsys.readouterr().out
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0  # a resumed run does not sweep again
    assert "sweeping" not in capsys.readouterr().out
