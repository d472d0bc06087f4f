"""``muonkit demo`` / ``train`` run directories and flags: a new run never writes into another run's directory, a
resumed run keeps its config, damaged files are named in one line, and every bad flag is one line and exit 2."""

from __future__ import annotations

import json

import pytest

from muonkit.cli import main
from muonkit.train import builtin_corpus

QUICK = ["--quick", "--no-progress"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_bytes(bytes(builtin_corpus().train[:60_000].tolist()))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished quick demo run."""
    out = tmp_path_factory.mktemp("runs") / "A"
    assert main(["demo", *QUICK, "--out", str(out)]) == 0
    return out


def _one_line_error(capsys, code, *words):
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


def test_a_new_run_refuses_a_directory_holding_another_run(run_dir, text_file, capsys):
    before = (run_dir / "results.json").read_text()
    code = main(["train", "--data", str(text_file), *QUICK, "--lr", "muon=0.5", "--out", str(run_dir)])
    _one_line_error(capsys, code, "holds another run", "--resume", "--overwrite")
    assert (run_dir / "results.json").read_text() == before


def test_a_run_that_cannot_start_leaves_the_directory_as_it_was(run_dir, capsys):
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    code = main(["demo", "--no-progress", "--size", "nosuch", "--overwrite", "--out", str(run_dir)])
    assert code == 2 and "nosuch" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_overwrite_replaces_the_run_and_results_record_the_new_one(tmp_path, text_file, capsys):
    out = tmp_path / "B"
    assert main(["demo", *QUICK, "--out", str(out)]) == 0
    assert main(["train", "--data", str(text_file), *QUICK, "--lr", "muon=0.05", "--overwrite", "--out", str(out)]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["command"] == "train" and saved["config"]["lrs"] == {"muon": 0.05}
    assert saved["runs"]["muon"]["lr"] == 0.05  # trained at the new lr, not the old run reprinted


@pytest.mark.parametrize(
    "flags, words",
    [(["--steps", "5"], ["--steps", "5"]), (["--lr", "muon=0.5"], ["--lr"]), (["--size", "large"], ["--size"]),
     (["--optimizers", "muon"], ["--optimizers"]), (["--quick"], ["--quick"])],
    ids=["steps", "lr", "size", "optimizers", "quick"],
)  # fmt: skip
def test_resume_refuses_flags_that_contradict_the_saved_run(run_dir, capsys, flags, words):
    code = main(["demo", "--resume", str(run_dir), "--no-progress", *flags])
    _one_line_error(capsys, code, "contradict", *words)


def test_resume_accepts_flags_that_agree_with_the_saved_run(run_dir):
    saved = json.loads((run_dir / "results.json").read_text())["config"]
    assert main(["demo", "--resume", str(run_dir), "--no-progress", "--steps", str(saved["steps"])]) == 0


def test_damaged_results_and_checkpoints_are_named_in_one_line(tmp_path, run_dir, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text('{"config": {"comm')
    _one_line_error(capsys, main(["demo", "--resume", str(broken)]), "results.json", "cannot be read")
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "results.json").write_text((run_dir / "results.json").read_text().replace('"done": true', '"done": false'))
    (cut / "checkpoint-muon.pt").write_bytes(b"PK\x03\x04 truncated")
    _one_line_error(
        capsys, main(["demo", "--resume", str(cut), "--no-progress"]), "checkpoint-muon.pt", "cannot be read"
    )


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--lr", "muon=-1"], ["--lr", "> 0"]),
        (["--lr", "muon=nan"], ["--lr"]),
        (["--lr", "adamw=inf"], ["--lr"]),
        (["--lr", "muon"], ["NAME=VALUE"]),
        (["--steps", "-5"], ["--steps", ">= 1"]),
        (["--steps", "0"], ["--steps", ">= 1"]),
        (["--batch-size", "-3"], ["--batch-size"]),
        (["--batch-size", "0"], ["--batch-size"]),
        (["--eval-every", "0"], ["--eval-every"]),
        (["--device", "foo"], ["--device", "foo"]),
        (["--device", "cuda:7"], ["--device"]),
        (["--optimizers", "muon,lion"], ["lion"]),
        (["--schedule", "linear"], ["--schedule"]),
        (["--warmup", "-1"], ["--warmup"]),
        (["--weight-decay", "adamw=-0.1"], ["--weight-decay", ">= 0"]),
        (["--weight-decay", "lion=0.1"], ["--weight-decay", "lion"]),
        (["--clip", "nan"], ["--clip"]),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("--") else None,
)
def test_every_bad_flag_is_one_line_and_exit_2(tmp_path, capsys, flags, words):
    try:
        code = main(["demo", *QUICK, "--out", str(tmp_path / "x"), *flags])
    except SystemExit as exc:  # argparse's own refusal: one usage line plus the error, exit 2
        assert exc.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and all(w in err for w in words), err
        return
    _one_line_error(capsys, code, *words)
    assert not (tmp_path / "x" / "results.json").exists()


def test_paths_that_cannot_be_written_are_one_line(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a directory")
    _one_line_error(capsys, main(["demo", *QUICK, "--out", str(a_file)]), "not a directory")
    saved = tmp_path / "preset.json"
    saved.write_text("{}")
    design = ["coeffs", "design", "--method", "fixed-point", "--degree", "5", "--a", "3.25", "--save", str(saved)]
    _one_line_error(capsys, main(design), "exists", "--force")
    assert saved.read_text() == "{}"
    assert main([*design, "--force"]) == 0 and json.loads(saved.read_text())["rows"]


@pytest.mark.parametrize(
    "argv",
    [
        ["theory", "constant", "--kappa", "100000"],
        ["theory", "constant", "--l", "2"],
        ["theory", "constant", "--l", "0"],
        ["theory", "constant", "--q", "-1"],
        ["theory", "epsilon", "jordan", "--l", "nan"],
        ["theory", "bound", "--sigma", "nan"],
        ["theory", "bound", "--L", "0"],
        ["theory", "bound", "--T", "0"],
        ["coeffs", "show", "jordan", "--eps", "-0.1"],
        ["coeffs", "show", "jordan", "--steps", "0"],
        ["coeffs", "design", "--method", "tune", "--degree", "1"],
        ["coeffs", "design", "--method", "minimax", "--l", "1.5"],
    ],
    ids=lambda a: " ".join(a),
)
def test_numbers_out_of_range_in_theory_and_coeffs_are_refused(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "expected" in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["coeffs", "plot", "jordan", "--out", "/missing/dir/p.png"], ["/missing/dir/p.png"]),
        (["coeffs", "design", "--method", "fixed-point", "--degree", "5", "--a", "3.25", "--save", "/missing/d/x.json"],
         ["/missing/d/x.json"]),
        (["theory", "run", "constant", "--quick", "--out", "FILE"], ["File exists"]),
    ],
    ids=["plot-out", "design-save", "theory-out-file"],
)  # fmt: skip
def test_paths_in_theory_and_coeffs_are_one_line(tmp_path, capsys, argv, words):
    a_file = tmp_path / "FILE"
    a_file.write_text("x")
    argv = [str(a_file) if a == "FILE" else a for a in argv]
    _one_line_error(capsys, main(argv), *words)
