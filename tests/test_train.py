import json

import pytest
import torch

from muonkit.cli import main
from muonkit.train import SIZES, LMTask, builtin_corpus, text_corpus, train_one
from muonkit.train.corpus import CorpusError
from muonkit.train.tasks import DigitsTask

TINY = SIZES["tiny"]


@pytest.fixture(scope="module")
def corpus():
    return builtin_corpus()


@pytest.fixture
def text_file(tmp_path, corpus):
    path = tmp_path / "mytext.txt"
    path.write_bytes(bytes(corpus.train[:60_000].tolist()))
    return path


def test_builtin_corpus_is_deterministic_and_split(corpus):
    again = builtin_corpus()
    assert torch.equal(corpus.train, again.train) and torch.equal(corpus.val, again.val)
    assert 0.08 < corpus.val.numel() / corpus.n_tokens < 0.12
    assert corpus.train.dtype == torch.uint8 and len(corpus.sources) == 20  # byte ids, held as bytes
    assert len(torch.unique(corpus.train)) > 60  # text: letters, digits, punctuation, whitespace


def test_quick_demo_writes_results_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "to AdamW val" in printed and str(out / "results.json") in printed
    data = json.loads((out / "results.json").read_text())
    assert data["interrupted"] is False
    assert set(data["runs"]) == {"muon", "adamw"}
    for key in ("target_val_loss", "subject_steps_to_target", "step_ratio", "time_ratio"):
        assert key in data["comparison"]
    assert data["environment"]["torch"] == torch.__version__
    for run in data["runs"].values():
        val = run["metrics"]["val_loss"]
        assert run["eval_steps"][-1] == 40 and run["done"]
        assert val[-1] < val[0] - 1.5  # from ~ln(256) = 5.5 down by well over a nat
        assert (
            run["train_seconds"] > 0 and run["items_per_s"] > 0 and 0 < run["optimizer_seconds"] < run["train_seconds"]
        )
    for png in ("val_loss_vs_step.png", "val_loss_vs_time.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_wall_clock_counts_building_the_optimizer_and_steps_but_not_the_statistics(corpus, monkeypatch):
    """A slow optimizer build lands in the run's wall-clock (from its first evaluation on); Muon's NS statistics
    are recomputed while the clock is stopped, after the evaluated steps, each of them an ordinary one."""
    import time

    from muonkit import Muon
    from muonkit.train import loop

    task = LMTask(corpus, TINY, batch_size=4, eval_batches=2)
    events = []
    real_make, real_stats = loop.make_optimizer, Muon.recompute_stats
    real_start, real_stop = loop._Clock.start, loop._Clock.stop

    def slow_make(*args, **kwargs):
        time.sleep(0.3)
        return real_make(*args, **kwargs)

    def stats(self):
        events.append(("stats", self.diagnostics))
        return real_stats(self)

    def start(self):
        events.append("start")
        real_start(self)

    def stop(self):
        events.append("stop")
        return real_stop(self)

    monkeypatch.setattr(loop, "make_optimizer", slow_make)
    monkeypatch.setattr(Muon, "recompute_stats", stats)
    monkeypatch.setattr(loop._Clock, "start", start)
    monkeypatch.setattr(loop._Clock, "stop", stop)
    r = train_one(task, "muon", steps=6, eval_every=3)
    assert r.eval_wall[0] >= 0.3 and r.train_seconds >= 0.3
    assert events == ["start", "stop", ("stats", False), "start", "stop", ("stats", False), "start"]
    assert len(r.ns_stats["orth_error"]) == 2 and len(r.train_loss) == 6 and r.optimizer_seconds > 0


def test_same_seed_same_numbers(corpus):
    task = LMTask(corpus, TINY, batch_size=4, eval_batches=2)
    a = train_one(task, "muon", steps=6, eval_every=3)
    b = train_one(task, "muon", steps=6, eval_every=3)
    assert a.train_loss == b.train_loss and a.val_loss == b.val_loss
    c = train_one(task, "muon", steps=6, eval_every=3, seed=1)
    assert c.train_loss != a.train_loss


def test_muon_runs_record_the_ns_outputs_statistics_at_each_evaluation(corpus):
    """At every evaluation after the first, a Muon run records its NS output's diagnostics (results.json carries
    them); the other steps run without them, and an AdamW run has none."""
    task = LMTask(corpus, TINY, batch_size=4, eval_batches=2)
    r = train_one(task, "muon", steps=6, eval_every=3)
    assert set(r.ns_stats) == {"orth_error", "sigma_min", "sigma_max", "epsilon", "chi", "l_effective"}
    assert all(0 < x < 1 for x in r.ns_stats["l_effective"])
    assert all(len(v) == len(r.eval_steps) - 1 == 2 for v in r.ns_stats.values())
    assert all(0.5 < s < 1.5 for s in r.ns_stats["sigma_max"]) and all(0 <= e <= 1 for e in r.ns_stats["epsilon"])
    assert train_one(task, "adamw", steps=3, eval_every=3).ns_stats == {}


def test_effective_l_is_the_smallest_singular_value_holding_the_energy():
    """A 3 x 5 update with singular values (3, 2, 1e-4) (normalised: 0.83, 0.55, 2.8e-5): 99% of the energy is in
    the first two, so l = 0.55; all of it takes the third."""
    from muonkit import Muon
    from muonkit.train.loop import effective_l

    U, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    G = (U * torch.tensor([3.0, 2.0, 1e-4], dtype=torch.float64)) @ V.T
    p = torch.nn.Parameter(torch.zeros(3, 5, dtype=torch.float64))
    opt = Muon([p], momentum=0.0, nesterov=False, momentum_dtype=None)
    p.grad = G.clone()
    opt.step()  # with momentum 0 the buffer is the gradient
    norm = (9 + 4 + 1e-8) ** 0.5
    assert effective_l(opt) == pytest.approx(2 / norm, rel=1e-6)  # float32 SVDs
    assert effective_l(opt, energy=1.0) == pytest.approx(1e-4 / norm, rel=1e-2)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_torch_muon_is_a_demo_optimizer_that_learns_and_resumes(corpus, tmp_path):
    """torch.optim.Muon on the hidden matrices plus AdamW on the rest, as one optimizer of the comparison: it
    learns, and a run resumed from its checkpoint continues bitwise as the uninterrupted one."""
    from muonkit.train.optimizers import Combined, make_optimizer, resolve_lrs

    task = LMTask(corpus, TINY, batch_size=4, eval_batches=2)
    opt = make_optimizer("torch_muon", task.build_model(), resolve_lrs("lm-tiny"))
    assert isinstance(opt, Combined) and isinstance(opt.optimizers[0], torch.optim.Muon)
    assert all(p.ndim == 2 for g in opt.optimizers[0].param_groups for p in g["params"])
    full = train_one(task, "torch_muon", steps=8, eval_every=4)
    assert full.val_loss[-1] < full.val_loss[0]
    _, resumed = _interrupted_then_resumed(task, "torch_muon", 8, 5, tmp_path / "ckpt.pt")
    assert resumed.val_loss == full.val_loss and resumed.train_loss == full.train_loss


def _interrupted_then_resumed(task, name, steps, stop, ckpt):
    """Train ``name`` for ``steps`` (evaluating every 4), interrupted after ``stop`` steps with a checkpoint at
    ``ckpt``, then resumed from it: ``(the evaluation steps the checkpoint held, the resumed run's result)``."""

    calls = [0]

    def interrupt(result):  # called after every step
        calls[0] += 1
        if calls[0] == stop:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_one(task, name, steps=steps, eval_every=4, checkpoint=ckpt, on_step=interrupt)
    state = torch.load(ckpt, weights_only=False)
    saved_steps = list(state["result"]["eval_steps"])  # before resuming extends them
    return saved_steps, train_one(task, name, steps=steps, eval_every=4, checkpoint=ckpt, resume=state)


def test_resume_from_checkpoint_matches_uninterrupted(corpus, tmp_path):
    task = LMTask(corpus, TINY, batch_size=4, eval_batches=2)
    full = train_one(task, "muon", steps=12, eval_every=4)
    saved_steps, resumed = _interrupted_then_resumed(task, "muon", 12, 7, tmp_path / "ckpt.pt")
    assert saved_steps == [0, 4]
    assert resumed.val_loss == full.val_loss and resumed.train_loss == full.train_loss


def test_cli_interrupt_keeps_results_and_resume_continues(tmp_path, text_file, monkeypatch, capsys):
    args = ["train", "--data", str(text_file), "--size", "tiny", "--steps", "12", "--eval-every", "4", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    calls = {"n": 0}
    original = LMTask.train_batch

    def flaky(self, gen):
        calls["n"] += 1
        if calls["n"] == 12 + 7:  # muon finished (12 batches), AdamW interrupted at its 7th step
            raise KeyboardInterrupt
        return original(self, gen)

    monkeypatch.setattr(LMTask, "train_batch", flaky)
    out = tmp_path / "cut"
    assert main([*args, "--out", str(out)]) == 130
    partial = json.loads((out / "results.json").read_text())
    assert partial["interrupted"] is True and partial["runs"]["muon"]["done"]
    assert partial["runs"]["adamw"]["eval_steps"] == [0, 4]
    assert "--resume" in capsys.readouterr().out
    monkeypatch.setattr(LMTask, "train_batch", original)
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    done = json.loads((out / "results.json").read_text())
    for name in ("muon", "adamw"):
        assert done["runs"][name]["metrics"] == full["runs"][name]["metrics"]
        assert done["runs"][name]["train_loss"] == full["runs"][name]["train_loss"]


@pytest.mark.parametrize(
    "content, reason",
    [
        (None, "no such file"),
        (b"", "empty"),
        (b"\x00\x01\x02binary" * 1000, "binary"),
        (b"\xff\xfe not utf8 " * 1000, "UTF-8"),
        (b"too short", "too short"),
    ],
)
def test_train_bad_files_fail_with_one_line(tmp_path, capsys, content, reason):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    assert main(["train", "--data", str(path), "--quick", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert reason in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_usage_errors(tmp_path, capsys):
    assert main(["train", "--quick"]) == 2
    assert main(["demo", "--quick", "--optimizers", "muon,lion"]) == 2
    assert main(["demo", "--quick", "--lr", "muon"]) == 2
    assert main(["demo", "--resume", str(tmp_path)]) == 2
    assert main(["demo", "--size", "huge", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "unknown optimizer" in err and "NAME=VALUE" in err and "results.json" in err


def test_text_corpus_short_split_rejected_by_task(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("x" * 5000)
    corpus = text_corpus(path)
    with pytest.raises(ValueError, match="too short"):
        LMTask(corpus, SIZES["large"])  # context 512 > 500-byte validation split
    with pytest.raises(CorpusError, match="no such file"):
        text_corpus(tmp_path / "missing.txt")
    assert text_corpus(tmp_path).sources == (str(path),)  # a directory: its files


def test_digits_task_learns():
    pytest.importorskip("sklearn")
    task = DigitsTask(batch_size=32)
    r = train_one(task, "muon", steps=100, eval_every=50)
    assert r.metrics["val_acc"][-1] > 0.85 and r.val_loss[-1] < r.val_loss[0]


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and "muonkit" in capsys.readouterr().out


def test_a_large_text_file_is_held_once_as_bytes(tmp_path):
    """``train --data``: a text is held as one uint8 buffer (train and validation are views of it), so loading a
    file costs about its size in memory, not eight times (int64 ids) or more (a decoded copy). Peak RSS of a fresh
    interpreter around ``text_corpus`` on a 64 MB file."""
    import subprocess
    import sys

    path = tmp_path / "big.txt"
    line = "The quick brown fox jumps over the lazy dog, ünïcödé included. 0123456789\n".encode()
    with path.open("wb") as f:
        for _ in range((64 << 20) // len(line)):
            f.write(line)
    size = path.stat().st_size
    script = (
        "import resource, sys, torch\n"
        "from muonkit.train.corpus import text_corpus, sample_batch\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"c = text_corpus({str(path)!r})\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "x, y = sample_batch(c.train, 2, 8, torch.Generator().manual_seed(0))\n"
        "same = c.train.untyped_storage().data_ptr() == c.val.untyped_storage().data_ptr()\n"
        "print((after - before) * 1024, c.train.dtype, x.dtype, same, c.n_tokens)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    grew, train_dtype, batch_dtype, shared, n_tokens = int(out[0]), out[1], out[2], out[3], int(out[4])
    assert train_dtype == "torch.uint8" and batch_dtype == "torch.int64" and shared == "True" and n_tokens == size
    assert grew < 1.5 * size, f"loading a {size >> 20} MB file raised peak RSS by {grew >> 20} MB"
