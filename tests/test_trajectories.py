"""Pinned CPU trajectories: a few short training runs whose every weight and momentum buffer must stay bitwise
what they were when ``tests/data/trajectories.pt`` was written. They guard restructuring (code moved between
modules, options gathered into one record, a step split into stages): such a change must not move one bit.

Bitwise equality holds for one torch build on one kind of CPU (ATen's vector kernels and the BLAS take other
paths on AVX2 than on AVX-512, and rounding moves by about 1e-6): the file holds one pin per platform (torch
version, ATen's CPU capability, CPU vendor). Where a pin of this platform exists the runs must equal it bitwise;
against every pin they must agree to a tolerance that platform rounding stays well inside (measured: at most
2.3e-6 of a tensor's largest entry in float32, 1.8e-3 with bf16 NS, between an AVX2 and another machine), so the
guard runs on any machine. Add this machine's pin with ``python tests/test_trajectories.py --write``; replace
pins only for a change that is meant to alter results, and say so in the commit.
"""

from __future__ import annotations

import platform
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


# How far a tensor may move between platforms, as a fraction of its largest entry (see the module docstring)
TOLERANCE = {"bf16-ns": 1e-2}
TOLERANCE_FP32 = 2e-5


def this_platform() -> dict[str, str]:
    """What decides the bits of a CPU run: the torch version, ATen's CPU capability and the CPU's vendor."""
    vendor = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            vendor = next(line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id"))
    except (OSError, StopIteration):
        pass
    return {"torch": torch.__version__.split("+")[0], "cpu": torch.backends.cpu.get_cpu_capability(), "vendor": vendor}


def _pins() -> list[dict]:
    if not DATA.exists():
        pytest.fail(f"{DATA} is missing: write it with 'python tests/test_trajectories.py --write'")
    return torch.load(DATA, weights_only=True)["pins"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_trajectory_is_bitwise_the_pinned_one(case):
    here = this_platform()
    pin = next((p for p in _pins() if p["platform"] == here), None)
    if pin is None:
        pytest.skip(f"no pin for {here} (the tolerance test below still runs); add one with --write")
    want = pin["cases"][case]
    got = run(CASES[case])
    assert got.keys() == want.keys()
    moved = [k for k in want if not torch.equal(got[k], want[k])]
    assert not moved, f"{case}: these tensors differ from the pinned trajectory: {moved}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_trajectory_is_close_to_every_pin(case):
    """On any machine: the run agrees with every platform's pin to within platform rounding."""
    got = run(CASES[case])
    tol = TOLERANCE.get(case, TOLERANCE_FP32)
    for pin in _pins():
        want = pin["cases"][case]
        assert got.keys() == want.keys()
        far = {k: float((got[k] - want[k]).abs().max() / want[k].abs().max().clamp_min(1e-30)) for k in want}
        moved = {k: f"{v:.1e}" for k, v in far.items() if v > tol}
        assert not moved, f"{case}: these tensors moved more than {tol:g} from the pin of {pin['platform']}: {moved}"


def test_pinned_runs_really_train():
    """The pinned runs are not trivial: every case moved the weights away from their initial values."""
    torch.manual_seed(0)
    init = {f"param/{k}": v.detach() for k, v in Tiny().named_parameters()}
    for pin in _pins():
        for case, tensors in pin["cases"].items():
            assert all(not torch.equal(tensors[k], v) for k, v in init.items()), case


if __name__ == "__main__" and "--write" in sys.argv:  # this platform's pin, added or replaced; the others kept
    here = this_platform()
    pins = [p for p in (torch.load(DATA, weights_only=True)["pins"] if DATA.exists() else []) if p["platform"] != here]
    DATA.parent.mkdir(exist_ok=True)
    torch.save({"pins": [*pins, {"platform": here, "cases": {c: run(o) for c, o in CASES.items()}}]}, DATA)
    print(f"wrote {DATA}: pins for {[p['platform'] for p in pins]} and {here}")
