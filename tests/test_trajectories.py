"""Pinned CPU trajectories: a few short training runs whose every weight and momentum buffer must stay bitwise
what they were when ``tests/data/trajectories.pt`` was written. They guard restructuring (code moved between
modules, options gathered into one record, a step split into stages): such a change must not move one bit.

Bitwise equality holds for one torch build on one kind of CPU; the file records the torch version it was
written with and the test is skipped under another. Rewrite the file only for a change that is meant to alter
results, and say so in the commit: ``python tests/test_trajectories.py --write``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import muonkit

DATA = Path(__file__).parent / "data" / "trajectories.pt"
STEPS = 3


class Tiny(nn.Module):
    """Embedding, fused QKV, a conv kernel, MLP, norm and head: every kind of parameter ``param_groups`` sorts."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.qkv = nn.Linear(8, 24, bias=False)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 20)
        self.fc2 = nn.Linear(20, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 11)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        h = h + torch.softmax(q @ k.mT / 8**0.5, -1) @ v
        h = h + self.conv(h.mT).mT
        h = h + self.fc2(torch.relu(self.fc(self.norm(h))))
        return self.head(h)


CASES: dict[str, dict] = {
    "defaults": {},
    "wd-no-nesterov": {"weight_decay": 0.1, "nesterov": False},
    "gram-rms": {"method": "gram", "adjust_lr": "match_rms_adamw", "coefficients": "polar_express"},
    "batch-view-maxbatch": {"matrix_view": "batch", "max_batch": 2, "ns_steps": 6, "momentum_dtype": None},
    "bf16-ns": {"ns_dtype": torch.bfloat16, "eps": 1e-5},
}


def run(options: dict) -> dict[str, torch.Tensor]:
    """``STEPS`` steps of ``Tiny`` with ``Muon(param_groups(model, split=qkv in 3), **options)``; the weights and
    every state tensor afterwards, by name."""
    torch.manual_seed(0)
    model = Tiny()
    opt = muonkit.Muon(muonkit.param_groups(model, split={"qkv.weight": 3}), **options)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randint(0, 11, (4, 6), generator=gen)
        y = (3 * x + 1) % 11
        loss = nn.functional.cross_entropy(model(x).reshape(-1, 11), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = {f"param/{k}": v.detach().clone() for k, v in model.named_parameters()}
    names = {p: k for k, p in model.named_parameters()}
    for p, state in opt.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"state/{names[p]}/{key}"] = value.detach().clone()
    return out


def _pinned() -> dict:
    if not DATA.exists():
        pytest.fail(f"{DATA} is missing: write it with 'python tests/test_trajectories.py --write'")
    return torch.load(DATA, weights_only=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_trajectory_is_bitwise_the_pinned_one(case):
    pinned = _pinned()
    if pinned["torch"] != torch.__version__.split("+")[0]:
        pytest.skip(f"pinned with torch {pinned['torch']}, this is {torch.__version__}")
    want = pinned["cases"][case]
    got = run(CASES[case])
    assert got.keys() == want.keys()
    moved = [k for k in want if not torch.equal(got[k], want[k])]
    assert not moved, f"{case}: these tensors differ from the pinned trajectory: {moved}"


def test_pinned_runs_really_train():
    """The pinned runs are not trivial: every case moved the weights away from their initial values."""
    torch.manual_seed(0)
    init = {f"param/{k}": v.detach() for k, v in Tiny().named_parameters()}
    for case, tensors in _pinned()["cases"].items():
        assert all(not torch.equal(tensors[k], v) for k, v in init.items()), case


if __name__ == "__main__" and "--write" in sys.argv:
    DATA.parent.mkdir(exist_ok=True)
    torch.save({"torch": torch.__version__.split("+")[0], "cases": {c: run(o) for c, o in CASES.items()}}, DATA)
    print(f"wrote {DATA}")
