"""StatsLogger: Muon's diagnostics to CSV and TensorBoard, read back."""

import csv

import pytest
import torch
from torch import nn

import muonkit


def _train(logger, steps=6, diagnostics=True):
    """Train a small MLP, logging every step; ``{logged step: that step's stats}``, the stats read from a twin
    optimizer with diagnostics on (the same model and batches) when ``diagnostics`` is off."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [muonkit.Muon(muonkit.param_groups(m), diagnostics=d) for m, d in zip(models, (diagnostics, True))]
    seen = {}
    for step in range(steps):
        x = torch.randn(32, 8)
        for model, opt in zip(models, opts):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        if logger.log(step, opts[0]):
            seen[step] = opts[1].stats()
    return seen


def test_csv_holds_exactly_the_stats_of_the_logged_steps(tmp_path):
    path = tmp_path / "sub" / "stats.csv"
    with muonkit.StatsLogger(path, every=2) as log:
        seen = _train(log)
    rows = list(csv.DictReader(path.open()))
    assert sorted(seen) == [0, 2, 4]
    got = {(int(r["step"]), r["key"]): float(r["value"]) for r in rows}
    want = {(s, k): v for s, stats in seen.items() for k, v in stats.items()}
    assert got == want
    assert any(k.endswith("orth_error") for _, k in got) and any(k.endswith("update_rms") for _, k in got)
    # appending later keeps one header
    with muonkit.StatsLogger(path) as log:
        log.log(10, {"custom": 1.5})
    text = path.read_text().splitlines()
    assert text.count("step,key,value") == 1 and text[-1] == "10,custom,1.5"


def test_a_muon_without_diagnostics_logs_the_same_statistics(tmp_path):
    """Logged from an optimizer without diagnostics (its steps stay on the fast path), the statistics are those a
    twin with diagnostics on measured in the same steps."""
    path = tmp_path / "stats.csv"
    with muonkit.StatsLogger(path, every=2) as log:
        seen = _train(log, diagnostics=False)
    got = {(int(r["step"]), r["key"]): float(r["value"]) for r in csv.DictReader(path.open())}
    want = {(s, k): v for s, stats in seen.items() for k, v in stats.items()}
    assert set(got) == set(want) and any(k.endswith("orth_error") for _, k in got)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_tensorboard_scalars_round_trip(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with muonkit.StatsLogger(tmp_path / "tb", format="tensorboard") as log:
        seen = _train(log, steps=3)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    key = next(iter(seen[0]))
    events = acc.Scalars(key)
    assert [e.step for e in events] == [0, 1, 2]
    assert events[2].value == pytest.approx(seen[2][key], rel=1e-6)


def test_bad_arguments_and_closed_logger(tmp_path):
    with pytest.raises(ValueError, match="format"):
        muonkit.StatsLogger(tmp_path / "x", format="json")
    with pytest.raises(ValueError, match="every"):
        muonkit.StatsLogger(tmp_path / "x.csv", every=0)
    log = muonkit.StatsLogger(tmp_path / "x.csv")
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.log(0, {"a": 1.0})
