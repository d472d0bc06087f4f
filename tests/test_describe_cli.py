"""``muonkit describe``: the decision table for a model, from the command line."""

import json

import pytest
from torch import nn

from muonkit.cli import main


def tiny_cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def test_describe_builtin_gpt_with_split(capsys):
    assert main(["describe", "gpt:tiny", "--split", "*.qkv.weight=3"]) == 0
    out = capsys.readouterr().out
    assert "blocks.0.attn.qkv.weight" in out and "muon (split 3)" in out
    assert "wte.weight" in out and "embedding" in out


def test_describe_splits_columns_per_head(capsys):
    """Per head: the fused QKV's rows in 3 x heads, the output projection's columns in heads (``cols:``)."""
    argv = ["describe", "gpt:tiny", "--split", "*.qkv.weight=6", "--split", "*.attn.proj.weight=cols:2",
            "--split", "*.fc.weight=rows:4", "--split", "*.fc.weight=cols:2"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "muon (split 6)" in out and "muon (split {'cols': 2})" in out
    assert "muon (split {'rows': 4, 'cols': 2})" in out


def test_describe_json_from_a_factory(capsys):
    assert main(["describe", "tests.test_describe_cli:tiny_cnn", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["0.weight"]["algorithm"] == "muon" and "conv" in rows["0.weight"]["why"]
    assert rows["0.bias"]["algorithm"] == "adamw"
    assert rows["2.weight"]["algorithm"] == "adamw"  # the last Linear is the output head


@pytest.mark.parametrize(
    "argv,message",
    [
        (["describe", "nope"], "expected gpt:SIZE"),
        (["describe", "gpt:huge"], "unknown GPT size"),
        (["describe", "no_such_module_xyz:f"], "cannot import"),
        (["describe", "torch.nn:Linear"], "no arguments failed"),
        (["describe", "torch.nn:nothing_here"], "no attribute"),
        (["describe", "json:dumps"], "calling json:dumps"),
        (["describe", "gpt:tiny", "--split", "qkv"], "PATTERN=K"),
        (["describe", "gpt:tiny", "--split", "*.qkv.weight=5"], "cannot be cut into 5"),  # Muon refuses it too
        (["describe", "gpt:tiny", "--split", "*.qkv.weight=heads:2"], "'rows' or 'cols'"),
        (["describe", "gpt:tiny", "--split", "*.attn.proj.weight=cols:5"], "columns cannot be cut into 5"),
    ],
)
def test_describe_input_errors_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
