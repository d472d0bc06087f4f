"""``Muon.load_state_dict`` refuses what it cannot load, naming the group or parameter, before anything changes; a
step with bad stored state changes no parameter at all."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from muonkit import Muon, param_groups


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.fc = nn.Linear(6, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.emb(x))))


def _trained(steps: int = 2) -> tuple[Net, Muon]:
    torch.manual_seed(0)
    model = Net()
    opt = Muon(param_groups(model), lr=0.02, adamw_lr=1e-3)
    for t in range(steps):
        x = torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(t))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).reshape(-1, 10), x.reshape(-1)).backward()
        opt.step()
    return model, opt


def _muon_pid(sd):
    return next(g for g in sd["param_groups"] if g["algorithm"] == "muon")["params"][0]


def _adamw_pid(sd):
    return next(g for g in sd["param_groups"] if g["algorithm"] == "adamw")["params"][0]


def _set(sd, path, value):
    """``sd`` with the entry at ``path`` (keys, then a final key) replaced."""
    *keys, last = path
    node = sd
    for k in keys:
        node = node[k]
    node[last] = value


def _mutations():
    """(name, function that spoils a state dict in place, text the error must contain)."""

    def other_optimizer(kind):
        def spoil(sd):  # the same group layout, stepped once so that it has state
            torch.manual_seed(0)
            model = Net()
            other = kind([{"params": g["params"]} for g in param_groups(model)], lr=0.1, momentum=0.9)
            model(torch.zeros(1, 3, dtype=torch.long)).sum().backward()
            other.step()
            sd.clear()
            sd.update(other.state_dict())

        return spoil

    def group_option(key, value):  # in the Muon group, where every option is checked
        def spoil(sd):
            gi = next(i for i, g in enumerate(sd["param_groups"]) if g["algorithm"] == "muon")
            _set(sd, ["param_groups", gi, key], value)

        return spoil

    def muon_state(key, value_of):
        def spoil(sd):
            pid = _muon_pid(sd)
            sd["state"][pid][key] = value_of(sd["state"][pid].get("momentum_buffer"))

        return spoil

    def adamw_state(key, value_of):
        def spoil(sd):
            pid = _adamw_pid(sd)
            sd["state"][pid][key] = value_of(sd["state"][pid][key])

        return spoil

    def swap_algorithms(sd):
        a, b = sd["param_groups"][0], sd["param_groups"][1]
        a["algorithm"], b["algorithm"] = b["algorithm"], a["algorithm"]

    def drop_group(sd):
        sd["param_groups"].pop()

    def drop_param(sd):
        sd["param_groups"][0]["params"].pop()

    return [
        ("torch RMSprop's state dict", other_optimizer(torch.optim.RMSprop), "not saved by muonkit.Muon"),
        ("torch SGD's state dict", other_optimizer(torch.optim.SGD), "not saved by muonkit.Muon"),
        ("negative lr", group_option("lr", -1.0), "lr must be"),
        ("momentum of 1.5", group_option("momentum", 1.5), "momentum must be"),
        ("unknown method", group_option("method", "qr"), "method must be"),
        ("unknown preset", group_option("coefficients", "no-such-preset"), "no-such-preset"),
        ("string lr", group_option("lr", "0.02"), "lr must be"),
        ("algorithms swapped", swap_algorithms, "runs"),
        ("a group fewer", drop_group, "parameter groups"),
        ("a parameter fewer", drop_param, "parameters, this one"),
        ("buffer of another shape", muon_state("momentum_buffer", lambda b: b[:, :-1].clone()), "shape"),
        ("integer buffer", muon_state("momentum_buffer", lambda b: b.long()), "dtype"),
        ("buffer not a tensor", muon_state("momentum_buffer", lambda b: b.tolist()), "not a tensor"),
        ("state key of another optimizer", muon_state("exp_avg", lambda b: b.clone()), "another optimizer"),
        ("exp_avg of another shape", adamw_state("exp_avg", lambda v: v[:-1].clone()), "shape"),
        ("step of several numbers", adamw_state("step", lambda v: torch.zeros(3)), "'step'"),
    ]


@pytest.mark.parametrize("name,spoil,message", _mutations(), ids=[m[0] for m in _mutations()])
def test_a_state_dict_that_cannot_load_is_refused_and_nothing_changes(name, spoil, message):
    _, saved = _trained()
    sd = copy.deepcopy(saved.state_dict())
    spoil(sd)
    _, opt = _trained(steps=1)
    before_groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    before_state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == before_groups
    for p, s in opt.state.items():
        assert all(torch.equal(v, before_state[id(p)][k]) for k, v in s.items())


def test_the_unspoiled_state_dict_loads_and_the_runs_continue_alike():
    model_a, _ = _trained(steps=3)
    model_b, b = _trained(steps=2)
    model_c, c = _trained(steps=1)
    c.load_state_dict(copy.deepcopy(b.state_dict()))
    model_c.load_state_dict(model_b.state_dict())
    for model, opt in ((model_b, b), (model_c, c)):
        x = torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(2))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).reshape(-1, 10), x.reshape(-1)).backward()
        opt.step()
    for p, q, r in zip(model_a.parameters(), model_b.parameters(), model_c.parameters()):
        assert torch.equal(p, q) and torch.equal(q, r)


@pytest.mark.parametrize(
    "bad", [lambda b: b[:, :-1].clone(), lambda b: b.long(), lambda b: "not a tensor"], ids=["shape", "int", "str"]
)
def test_a_step_over_bad_stored_state_changes_no_parameter(bad):
    """A momentum buffer edited by hand: the step raises naming the parameter before any parameter, AdamW's
    included, or any other state changes."""
    model, opt = _trained(steps=1)
    muon_p = next(p for g in opt.param_groups if g["algorithm"] == "muon" for p in g["params"])
    opt.state[muon_p]["momentum_buffer"] = bad(opt.state[muon_p]["momentum_buffer"])
    x = torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(5))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x).reshape(-1, 10), x.reshape(-1)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    steps = [s["step"].clone() for s in opt.state.values() if "step" in s]
    with pytest.raises(ValueError, match=r"fc\.weight"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(torch.equal(s["step"], t) for s, t in zip([s for s in opt.state.values() if "step" in s], steps))
