import pytest

from muonkit.cli import main


def test_quick_demo_prints_comparison(capsys):
    assert main(["demo", "--quick"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("muon ", "adamw "))}
    assert set(rows) == {"muon", "adamw"}
    # both runs learned something: final validation loss well below the uniform-byte loss ln(256) = 5.55
    for cols in rows.values():
        assert float(cols[3]) < 4.0
    assert "AdamW's final validation loss" in out


def test_demo_rejects_unknown_optimizer(capsys):
    assert main(["demo", "--quick", "--optimizers", "muon,lion"]) == 2
    assert "unknown optimizer" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and "muonkit" in capsys.readouterr().out
