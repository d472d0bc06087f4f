"""The one record of Muon's options (``muonkit.optim.options``) and the places that must agree with it."""

import inspect

import pytest
import torch
from torch import nn

from muonkit import Muon
from muonkit.optim import functional, options


def test_muon_signature_defaults_are_the_records():
    params = inspect.signature(Muon).parameters
    assert {o.name for o in options.OPTIONS} <= set(params)
    for o in options.OPTIONS:
        assert params[o.name].default == o.default, o.name
    opt = Muon([nn.Parameter(torch.zeros(4, 4))])
    assert {k: opt.defaults[k] for k in options.DEFAULTS} == options.DEFAULTS


def test_functional_step_defaults_are_the_records():
    """``muon_step``'s optional arguments default to the record's values (``muon_steps`` fills them from there)."""
    optional = {n for n, p in inspect.signature(functional.muon_step).parameters.items() if p.default is not p.empty}
    assert set(functional._STEP_DEFAULTS) == optional
    shared = optional & set(options.DEFAULTS)
    ns = {"ns_dtype", "method", "restarts", "matrix_view", "split", "max_batch"}
    assert shared == ns | {"precondition", "postscale", "update"}
    assert all(functional._STEP_DEFAULTS[n] == options.DEFAULTS[n] for n in shared)


BAD = {
    "lr": -1.0,
    "momentum": 1.0,
    "weight_decay": float("nan"),
    "ns_steps": 2.5,
    "coefficients": "no-such-preset",
    "adjust_lr": 0,
    "eps": "x",
    "ns_dtype": torch.int32,
    "method": "qr",
    "matrix_view": "rows",
    "max_batch": 0,
    "nesterov": "yes",
    "momentum_dtype": torch.int64,
    "precondition": "no-such-stage",
    "postscale": None,
    "update": "adamw",
}


WRONG_TYPES = [  # values of the wrong type that float() or == would have let through
    ("lr", "0.02"),
    ("lr", True),
    ("momentum", "0.9"),
    ("weight_decay", b"0"),
    ("eps", [1e-7]),
    ("nesterov", 1),
    ("momentum_dtype", "float32"),
    ("ns_steps", 5.0),
    ("max_batch", True),
    ("adjust_lr", "sqrt"),
    ("ns_dtype", "bf16"),
    ("postscale", ["none"]),
]


@pytest.mark.parametrize("name,value", WRONG_TYPES)
def test_options_of_the_wrong_type_are_refused_at_construction(name, value):
    with pytest.raises(ValueError, match=name):
        Muon([nn.Parameter(torch.zeros(4, 4))], **{name: value})
    opt = Muon([nn.Parameter(torch.zeros(4, 4))])
    with pytest.raises(ValueError, match=name):  # and when a group is added later
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3, 3))], name: value})


def test_numbers_of_every_real_kind_are_accepted():
    for lr in (0.02, 1, torch.tensor(0.02)):
        Muon([nn.Parameter(torch.zeros(4, 4))], lr=lr)


@pytest.mark.parametrize(
    "make", [lambda: torch.zeros(4, 4, dtype=torch.int64), lambda: torch.zeros(4, 4, dtype=torch.bool),
             lambda: torch.zeros(4, 4, device="meta")],
    ids=["int64", "bool", "meta"],
)  # fmt: skip
@pytest.mark.parametrize("algorithm", ["muon", "adamw"])
def test_parameter_kinds_that_cannot_step_are_refused_where_the_group_is_built(make, algorithm):
    p = make()
    with pytest.raises(ValueError, match="parameter"):
        Muon([{"params": [p], "algorithm": algorithm}])


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_checked_option_refuses_a_bad_value_by_name(name):
    with pytest.raises(ValueError, match=name if name != "coefficients" else "no-such-preset"):
        Muon([nn.Parameter(torch.zeros(4, 4))], **{name: BAD[name]})


def test_every_option_either_checks_or_says_where_it_is_checked():
    """An option without its own check is one the record names as checked elsewhere."""
    unchecked = {o.name for o in options.OPTIONS if o.check("x", object()) is None}
    assert unchecked == {"restarts", "split"}
    assert set(BAD) == {o.name for o in options.OPTIONS} - unchecked


def test_all_errors_of_a_group_are_reported_together():
    with pytest.raises(ValueError, match=r"lr must be .*; momentum must be .*; method must be"):
        Muon([nn.Parameter(torch.zeros(4, 4))], lr=-1, momentum=2, method="qr")
    with pytest.raises(ValueError, match="restarts applies to method='gram' or 'auto' only"):
        Muon([nn.Parameter(torch.zeros(4, 4))], method="newton_schulz", restarts=[2])


def test_plan_key_follows_plan_options_only():
    base = {**options.DEFAULTS}
    key = options.plan_key(base)
    for o in options.OPTIONS:
        changed = {**base, o.name: {"nesterov": False, "ns_steps": 6, "coefficients": "you", "eps": 1e-6,
                                    "ns_dtype": torch.float16, "method": "gram", "restarts": [2],
                                    "matrix_view": "batch", "split": 3, "max_batch": 4}.get(o.name, 0.5)}  # fmt: skip
        assert (options.plan_key(changed) != key) == o.in_plan, o.name


def test_sharded_steps_take_the_functional_steps_options_and_refuse_others_by_name():
    from muonkit.distributed import sharded_muon_step, zero_muon_step

    required = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, adjust_lr="original")
    sharded_muon_step([], [], [], **required, postscale="none")  # nothing to step: accepted
    with pytest.raises(TypeError, match=r"lacks \['momentum'\]"):
        sharded_muon_step([], [], [], **{k: v for k, v in required.items() if k != "momentum"})
    with pytest.raises(TypeError, match=r"unexpected options \['momentum_dtype'\]"):
        zero_muon_step([], [], [], executor=None, **required, momentum_dtype=torch.float32)
