import copy
import io

import pytest
import torch
from torch import nn

import muonkit
from muonkit import Muon, NonFiniteGradientError, orthogonalize
from muonkit.reference import newton_schulz_loop

F64 = torch.float64


def _params(shapes, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*s, generator=gen, dtype=dtype)) for s in shapes]


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


SHAPES = [(12, 8), (8, 12), (12, 8), (6, 6)]


def _step_together(pairs, steps):
    """Give each (params, optimizer) pair the same gradients (seeded by step) and step them all."""
    for t in range(steps):
        for params, _ in pairs:
            for p, g in zip(params, _grads(params, seed=t)):
                p.grad = g
        for _, opt in pairs:
            opt.step()


def test_callable_adjust_lr():
    (p,) = _params([(6, 4)])
    start = p.detach().clone()
    opt = Muon([p], lr=0.1, momentum=0.0, nesterov=False, adjust_lr=lambda lr, shape: lr * shape[0], ns_dtype=F64)
    g = _grads([p], 1)[0]
    p.grad = g
    opt.step()
    expected = start - 0.1 * 6 * orthogonalize(g, dtype=F64)
    assert torch.allclose(p.detach(), expected, atol=1e-12)


def test_numeric_adjust_lr_is_a_user_rms_factor():
    """adjust_lr=f gives lr * f * sqrt(max(rows, cols)); f = 0.2 is exactly "match_rms_adamw"."""
    runs = {}
    for adjust in (0.2, "match_rms_adamw", 0.35):
        (p,) = _params([(6, 4)])
        start = p.detach().clone()
        opt = Muon([p], lr=0.1, momentum=0.0, nesterov=False, adjust_lr=adjust, ns_dtype=F64)
        g = _grads([p], 1)[0]
        p.grad = g
        opt.step()
        runs[adjust] = p.detach().clone()
        if adjust == 0.35:
            expected = start - 0.1 * 0.35 * 6**0.5 * orthogonalize(g, dtype=F64)
            assert torch.allclose(runs[adjust], expected, atol=1e-12)
    assert torch.equal(runs[0.2], runs["match_rms_adamw"])


def test_matches_torch_optim_muon_plumbing(monkeypatch):
    """Same momentum, Nesterov, weight decay and lr rule as torch.optim.Muon: with torch's NS swapped
    for the float64 reference, the two optimizers agree to float64 rounding."""
    torch_muon = pytest.importorskip("torch.optim._muon")
    monkeypatch.setattr(
        torch_muon,
        "_zeropower_via_newtonschulz",
        lambda grad, coeffs, steps, eps: newton_schulz_loop(grad, [coeffs] * steps, eps),
    )
    ours, theirs = _params(SHAPES), _params(SHAPES)
    kw = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.05)
    a = Muon(ours, **kw, ns_dtype=F64, momentum_dtype=None)
    b = torch.optim.Muon(theirs, **kw, adjust_lr_fn="original")
    _step_together([(ours, a), (theirs, b)], 4)
    for p, q in zip(ours, theirs):
        assert torch.allclose(p, q, atol=1e-12, rtol=0)


def test_matches_torch_optim_muon_bf16():
    """Unpatched: torch.optim.Muon (bf16 NS, bf16 normalisation) vs ours with ns_dtype=bf16 (fp32
    normalisation). The displacement from the start agrees to within bf16 rounding (~1%)."""
    if not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    shapes = [(64, 32), (32, 64), (48, 48)]
    ours, theirs = _params(shapes, torch.float32), _params(shapes, torch.float32)
    start = [p.detach().clone() for p in ours]
    kw = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0)
    a = Muon(ours, **kw, ns_dtype=torch.bfloat16)
    b = torch.optim.Muon(theirs, **kw)
    _step_together([(ours, a), (theirs, b)], 3)
    for p, q, s in zip(ours, theirs, start):
        rel = (p - q).norm() / (q - s).norm()
        assert rel < 0.03, rel.item()


def test_adamw_groups_match_torch_adamw():
    shapes = [(10,), (7, 5), (3, 4, 2)]
    ours, theirs = _params(shapes, torch.float32), _params(shapes, torch.float32)
    kw = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    a = Muon([{"params": ours, "algorithm": "adamw", **kw}])
    b = torch.optim.AdamW(theirs, **kw, foreach=False)
    for t in range(5):
        for ps in (ours, theirs):
            for p, g in zip(ps, _grads(ps, seed=t)):
                p.grad = g
        # a parameter that misses a gradient for one step gets its own step count
        if t == 2:
            ours[0].grad = theirs[0].grad = None
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        assert torch.allclose(p, q, atol=1e-6, rtol=1e-6)


def test_adamw_group_defaults_and_options():
    p, q = _params([(4, 4), (4,)], torch.float32)
    opt = Muon([{"params": [p]}, {"params": [q], "algorithm": "adamw", "lr": 1e-3}], weight_decay=0.01)
    adamw = opt.param_groups[1]
    assert adamw["lr"] == 1e-3 and adamw["betas"] == (0.9, 0.95) and adamw["eps"] == 1e-8
    assert adamw["weight_decay"] == 0.01
    assert "momentum" not in adamw and "coefficients" not in adamw
    assert opt.param_groups[0]["eps"] == 1e-7 and opt.param_groups[0]["lr"] == 0.02


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 12)
        self.conv = nn.Conv1d(12, 12, 3, padding=1)
        self.fc = nn.Linear(12, 24)
        self.norm = nn.LayerNorm(24)
        self.head = nn.Linear(24, 16)

    def forward(self, idx):
        h = self.emb(idx).transpose(1, 2)
        h = torch.relu(self.conv(h)).transpose(1, 2)
        return self.head(self.norm(torch.relu(self.fc(h))))


def _batch(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 16, (8, 10), generator=gen)
    return x, (x * 3 + 1) % 16


def _train(model, opt, steps, start=0):
    losses = []
    for t in range(start, start + steps):
        x, y = _batch(t)
        loss = nn.functional.cross_entropy(model(x).reshape(-1, 16), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_small_model_learns():
    torch.manual_seed(0)
    model = TinyNet()
    opt = Muon(muonkit.param_groups(model), lr=0.02, adamw_lr=3e-3)
    losses = _train(model, opt, 60)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize(
    "coefficients,method",
    [(name, m) for name in muonkit.coefficients.list_presets() for m in ("newton_schulz", "gram")]
    + [("jordan", "svd")],  # the exact polar factor does not use the coefficients
)
def test_resume_is_bitwise_identical(coefficients, method):
    torch.manual_seed(0)
    model = TinyNet()
    init = copy.deepcopy(model.state_dict())

    def make(m):
        return Muon(muonkit.param_groups(m), coefficients=coefficients, method=method, weight_decay=0.01)

    opt = make(model)
    _train(model, opt, 6)

    other = TinyNet()
    other.load_state_dict(init)
    opt2 = make(other)
    _train(other, opt2, 3)
    buf = io.BytesIO()
    torch.save({"model": other.state_dict(), "opt": opt2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)

    resumed = TinyNet()
    resumed.load_state_dict(ckpt["model"])
    opt3 = make(resumed)
    opt3.load_state_dict(ckpt["opt"])
    _train(resumed, opt3, 3, start=3)
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


def test_low_precision_params_keep_fp32_momentum_across_load():
    (p,) = _params([(8, 8)], torch.bfloat16)
    opt = Muon([p])
    p.grad = torch.randn(8, 8, dtype=torch.bfloat16)
    opt.step()
    assert opt.state[p]["momentum_buffer"].dtype == torch.float32
    sd = copy.deepcopy(opt.state_dict())
    opt2 = Muon([p])
    opt2.load_state_dict(sd)
    buf = opt2.state[p]["momentum_buffer"]
    assert buf.dtype == torch.float32 and torch.equal(buf, opt.state[p]["momentum_buffer"])


def test_checkpoint_from_before_later_options_loads_and_steps():
    """A state dict saved before ``max_batch`` and ``restarts`` existed (its groups lack them) loads, takes
    their defaults and steps as the optimizer that saved it would (repeated steps included)."""
    params = _params(SHAPES)
    opt = Muon(params, ns_dtype=F64)
    _step_together([(params, opt)], 2)
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        del group["max_batch"], group["restarts"]
    twins = [p.detach().clone().requires_grad_() for p in params]
    old = Muon(twins, ns_dtype=F64, method="gram", restarts=[2])  # options the checkpoint does not override
    old.load_state_dict(sd)
    assert old.param_groups[0]["restarts"] is None and old.param_groups[0]["max_batch"] is None
    _step_together([(params, opt), (twins, old)], 3)
    for p, q in zip(params, twins):
        assert torch.equal(p, q)


def _one_step_update(p, grad, **group):
    start = p.detach().clone()
    opt = Muon(
        [{"params": [p], **group}],
        lr=1.0,
        momentum=0.0,
        nesterov=False,
        adjust_lr=None,
        ns_dtype=F64,
        momentum_dtype=None,
    )
    p.grad = grad
    opt.step()
    return start - p.detach()


def test_conv_kernels_are_flattened():
    (p,) = _params([(6, 3, 2, 2)])
    g = _grads([p], 3)[0]
    upd = _one_step_update(p, g)
    assert torch.allclose(upd, orthogonalize(g.reshape(6, -1), dtype=F64).reshape(g.shape), atol=1e-12)


def test_batch_view_orthogonalizes_each_matrix():
    (p,) = _params([(4, 6, 5)])
    g = _grads([p], 4)[0]
    upd = _one_step_update(p, g, matrix_view="batch")
    for e in range(4):
        assert torch.allclose(upd[e], orthogonalize(g[e], dtype=F64), atol=1e-12)


@pytest.mark.parametrize("split", [3, [5, 5, 5], [3, 8, 4]])
def test_split_orthogonalizes_parts_separately(split):
    (p,) = _params([(15, 5)])
    g = _grads([p], 5)[0]
    upd = _one_step_update(p, g, split=split)
    sizes = [5, 5, 5] if split == 3 else split
    expected = torch.cat([orthogonalize(part, dtype=F64) for part in g.split(sizes)])
    assert torch.allclose(upd, expected, atol=1e-12)


def test_batched_step_equals_one_optimizer_per_parameter():
    shapes = [(12, 8), (12, 8), (8, 12), (6, 4, 3, 3), (12, 8)]
    together, alone = _params(shapes), _params(shapes)
    opt = Muon(together, ns_dtype=F64, weight_decay=0.1)
    singles = [Muon([p], ns_dtype=F64, weight_decay=0.1) for p in alone]
    for t in range(3):
        for ps in (together, alone):
            for p, g in zip(ps, _grads(ps, seed=t)):
                p.grad = g
        opt.step()
        for o in singles:
            o.step()
    for p, q in zip(together, alone):
        assert torch.allclose(p, q, atol=1e-12, rtol=0)


def test_parameters_without_grad_are_untouched():
    p, q = _params([(5, 4), (5, 4)])
    q_start = q.detach().clone()
    opt = Muon([p, q])
    p.grad = torch.ones_like(p)
    opt.step()
    assert torch.equal(q, q_start) and q not in opt.state


def test_lr_scheduler_drives_both_algorithms():
    p, b = _params([(6, 6), (6,)])
    opt = Muon([{"params": [p]}, {"params": [b], "algorithm": "adamw"}], lr=0.1, adamw_lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(2):
        p.grad, b.grad = torch.randn(6, 6, dtype=F64), torch.randn(6, dtype=F64)
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.025, 0.0025]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "group, match",
    [
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"ns_steps": -1}, "ns_steps"),
        ({"ns_steps": 2.5}, "ns_steps"),
        ({"coefficients": "nope"}, "unknown coefficient preset"),
        ({"adjust_lr": "sqrt"}, "adjust_lr"),
        ({"adjust_lr": -0.2}, "adjust_lr"),
        ({"adjust_lr": float("inf")}, "adjust_lr"),
        ({"adjust_lr": True}, "adjust_lr"),
        ({"method": "qr"}, "method"),
        ({"matrix_view": "stack"}, "matrix_view"),
        ({"ns_dtype": torch.int8}, "ns_dtype"),
        ({"split": 4}, "cannot be cut"),
        ({"split": [3, 2]}, "add up"),
        ({"algorithm": "sgd"}, "algorithm"),
        ({"algorithm": "adamw", "betas": (0.9, 1.0)}, "betas"),
        ({"eps": -1.0}, "eps"),
        ({"max_batch": 0}, "max_batch"),
        ({"method": "gram", "restarts": [5]}, "between 1 and 4"),
        ({"method": "gram", "restarts": [0]}, "between 1 and 4"),
        ({"method": "gram", "restarts": [2.0]}, "restarts must be step indices"),
        ({"method": "gram", "restarts": 3}, "list of step indices"),
        ({"method": "gram", "ns_steps": 3, "restarts": [3]}, "between 1 and 2"),
        ({"method": "newton_schulz", "restarts": [2]}, "method='gram' or 'auto' only"),
        ({"restarts": [5]}, "between 1 and 4"),  # the default method ("auto") takes restarts, checked alike
    ],
)
def test_invalid_hyperparameters(group, match):
    (p,) = _params([(6, 6)])
    with pytest.raises(ValueError, match=match):
        Muon([{"params": [p], **group}])


def test_invalid_restarts_as_an_optimizer_default():
    (p,) = _params([(6, 12)])
    with pytest.raises(ValueError, match="list of step indices"):
        Muon([p], method="gram", restarts=3)
    with pytest.raises(ValueError, match="between 1 and 4"):
        Muon([p], method="gram", restarts=(2, 7))


def test_vector_in_muon_group_points_at_param_groups():
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"'bias'.*param_groups"):
        Muon(model.named_parameters())
    with pytest.raises(ValueError, match="param_groups"):
        Muon(model.parameters())


def test_complex_and_sparse_rejected():
    with pytest.raises(ValueError, match="complex"):
        Muon([nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))])
    emb = nn.Embedding(10, 4, sparse=True)
    opt = Muon([{"params": emb.parameters(), "algorithm": "adamw"}])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()


def test_nonfinite_policy_argument():
    with pytest.raises(ValueError, match="nonfinite"):
        Muon(_params([(3, 3)]), nonfinite="warn")


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        for key in a[k]:
            assert torch.equal(a[k][key], b[k][key])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_raises_and_changes_nothing(bad):
    named = [("w", _params([(5, 5)])[0]), ("b", _params([(5,)])[0])]
    params = [p for _, p in named]
    opt = Muon([{"params": [named[0]]}, {"params": [named[1]], "algorithm": "adamw"}])
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before_p, before_s = _snapshot(opt, params)
    params[1].grad = torch.tensor([0, 0, bad, 0, 0], dtype=F64)
    with pytest.raises(NonFiniteGradientError, match="'b'"):
        opt.step()
    after_p, after_s = _snapshot(opt, params)
    assert all(torch.equal(x, y) for x, y in zip(before_p, after_p))
    _same_state(before_s, after_s)


def test_nonfinite_skip_counts_and_round_trips():
    params = _params([(4, 4)])
    opt = Muon(params, nonfinite="skip")
    params[0].grad = torch.full((4, 4), float("nan"), dtype=F64)
    start = params[0].detach().clone()
    opt.step()
    assert opt.nonfinite_skips == 1 and torch.equal(params[0], start) and not opt.state
    opt2 = Muon(params, nonfinite="skip")
    opt2.load_state_dict(opt.state_dict())
    assert opt2.nonfinite_skips == 1
    opt3 = Muon(params, nonfinite="ignore")
    opt3.step()  # no check, no error
    assert torch.isnan(params[0]).all()


@pytest.mark.parametrize("kwargs", [{"method": "gram"}, {"max_batch": 2}, {"max_batch": 1, "method": "gram"}])
def test_gram_method_and_max_batch_match_default_step(kwargs):
    shapes = [(12, 8), (12, 8), (12, 8), (8, 20), (6, 4, 3, 3)]
    base, other = _params(shapes), _params(shapes)
    a = Muon(base, ns_dtype=F64, weight_decay=0.1)
    b = Muon(other, ns_dtype=F64, weight_decay=0.1, **kwargs)
    _step_together([(base, a), (other, b)], 3)
    for p, q in zip(base, other):
        assert torch.allclose(p, q, atol=1e-11, rtol=0)


def test_gram_restarts_option_reaches_the_orthogonalization():
    """``Muon(method="gram", restarts=...)`` orthogonalizes with those restart positions, on the torch path and
    the fused one's plan alike (CPU: the torch path; the plan's batches by ``merged_ns_batches`` and its merge
    key): each first update equals ``orthogonalize(..., restarts=...)`` of the same momentum, ``None`` equals
    the default placement written out, and another placement gives another update (bf16, low rank)."""
    from muonkit.optim.functional import _STEP_DEFAULTS
    from muonkit.optim.plans import merge_key

    gen = torch.Generator().manual_seed(3)
    low_rank = torch.randn(16, 2, generator=gen) @ torch.randn(2, 48, generator=gen)
    updates = {}
    for restarts in (None, (3,), (1,), (2, 4)):
        p = nn.Parameter(torch.zeros(16, 48))
        p.grad = low_rank.clone()
        opt = Muon([p], lr=1.0, momentum=0.0, nesterov=False, adjust_lr=None, method="gram", restarts=restarts,
                   ns_dtype=torch.bfloat16)  # fmt: skip
        opt.step()
        updates[restarts] = -p.detach().clone()
        want = orthogonalize(low_rank, method="gram", restarts=restarts, dtype=torch.bfloat16)
        assert torch.equal(updates[restarts], want.float()), restarts
        assert opt.param_groups[0]["restarts"] == (None if restarts is None else list(restarts))
    assert torch.equal(updates[None], updates[(3,)])  # the default for 5 steps
    assert not torch.equal(updates[(1,)], updates[(3,)]) and not torch.equal(updates[(2, 4)], updates[(3,)])
    # the fused path's batches: placements that differ are different NS problems; None and (3,) are one
    schedule = tuple(tuple(r) for r in muonkit.coefficients.schedule("jordan"))
    opts = {**_STEP_DEFAULTS, "method": "gram", "max_batch": None}
    key = {r: merge_key(16, 48, torch.bfloat16, schedule, {**opts, "restarts": r}) for r in (None, (3,), (2, 4))}
    assert key[None] == key[(3,)] != key[(2, 4)]


def test_step_hooks_profiler_range_and_subclasses_work_as_in_torch_optim():
    """Muon.step under torch.optim's step wrapper: the optimizer's and the global step hooks run once each, in
    torch's order, a pre-hook can replace the arguments, the profiler records ``Optimizer.step#Muon.step``, and a
    subclass's own step runs the hooks as a subclass of a torch optimizer does."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    def model_opt(cls=Muon):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(8, 4))
        w.grad = torch.randn(8, 4)
        return w, cls([w])

    w, opt = model_opt()
    calls = []
    handles = [
        opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", len(args)))),
        opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", len(args)))),
        register_optimizer_step_pre_hook(lambda o, args, kwargs: calls.append(("global pre", len(args)))),
        register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append(("global post", len(args)))),
    ]
    try:
        before = w.detach().clone()
        opt.step()
        assert calls == [("global pre", 1), ("pre", 1), ("post", 1), ("global post", 1)]
        assert not torch.equal(before, w.detach())
        calls.clear()
        assert opt.step(lambda: torch.tensor(3.0)) == 3.0
        assert calls == [("global pre", 2), ("pre", 2), ("post", 2), ("global post", 2)]
    finally:
        for h in handles:
            h.remove()
    calls.clear()
    opt.step()
    assert calls == []  # removed: the plain step
    replaced = opt.register_step_pre_hook(lambda o, args, kwargs: ((o, lambda: torch.tensor(7.0)), {}))
    assert opt.step() == 7.0  # the pre-hook's arguments are the ones the step gets
    replaced.remove()

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert any(e.name == "Optimizer.step#Muon.step" for e in prof.events())

    def logged(base):
        class Logged(base):
            def step(self, closure=None):
                calls.append("sub")
                return super().step(closure)

        return Logged

    seen = {}
    for base in (Muon, torch.optim.SGD):  # a subclass's hooks run as they do for a subclass of torch's own
        w = nn.Parameter(torch.randn(8, 4))
        w.grad = torch.randn(8, 4)
        base([w], lr=0.1).step()  # torch patches a class's step when its first instance is made
        sub = logged(base)([w], lr=0.1)
        sub.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
        calls.clear()
        sub.step()
        seen[base] = list(calls)
    assert seen[Muon] == seen[torch.optim.SGD] and "sub" in seen[Muon]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the fused path, which repeats plans)")
def test_a_training_loop_repeats_its_steps_on_cuda(monkeypatch):
    """A real loop (GPT with Muon and AdamW groups, QKV split, backward, ``zero_grad()`` setting gradients to None,
    a learning-rate schedule) takes the full step only at its first step; then every step repeats the plan
    (``Muon._step_again``) and the loss still falls."""
    from muonkit.optim import muon as muon_module
    from muonkit.train import GPT, SIZES

    full = []
    gather = muon_module.Muon._gather
    monkeypatch.setattr(muon_module.Muon, "_gather", lambda self: full.append(1) or gather(self))
    torch.manual_seed(0)
    model = GPT(SIZES["tiny"]).cuda()
    opt = Muon(muonkit.param_groups(model, split={"*.qkv.weight": 3}), lr=0.02, adamw_lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + 0.05 * k))
    data = torch.randint(0, 256, (8, 65), device="cuda")
    losses = []
    for _ in range(12):
        loss = model(data[:, :-1], data[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(float(loss))
    assert len(full) == 1, len(full)
    assert losses[-1] < losses[0]


def test_accel_switch_is_checked_read_from_the_environment_at_construction_and_applied_in_step(monkeypatch):
    """``Muon(accel=...)``: a bool or None; None reads MUONKIT_ACCEL when the optimizer is built (not later);
    ``accel=False`` steps run with every acceleration off (``accel.disabled``), and on CPU give the same result."""
    from muonkit import accel
    from muonkit.accel import kernels
    from muonkit.optim import functional

    with pytest.raises(TypeError, match="accel"):
        Muon([nn.Parameter(torch.zeros(4, 4))], accel="off")
    monkeypatch.setenv(accel.ENV, "0")
    built_off = Muon([nn.Parameter(torch.zeros(4, 4))])
    monkeypatch.setenv(accel.ENV, "1")
    assert built_off.accel is False and Muon([nn.Parameter(torch.zeros(4, 4))]).accel is True

    seen = []
    real = functional._fused_step_applies
    monkeypatch.setattr(functional, "_fused_step_applies", lambda *a: seen.append(kernels.get_mode()) or real(*a))
    results = []
    for on in (True, False):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(8, 6))
        opt = Muon([w], accel=on)
        for _ in range(2):
            w.grad = torch.randn(8, 6)
            opt.step()
        results.append(w.detach().clone())
    assert seen == ["auto", "auto", "torch", "torch"] and kernels.get_mode() == "auto"
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_pickled_or_copied_optimizer_keeps_its_settings_and_steps_the_same(how):
    """torch.optim pickles only defaults, state and groups: Muon's own settings (the non-finite policy and its
    count, diagnostics, the AdamW defaults) come along too, and the copy continues the same trajectory."""
    import pickle

    torch.manual_seed(3)
    params = [nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(4))]
    opt = Muon([{"params": params[:1]}, {"params": params[1:], "algorithm": "adamw"}], nonfinite="skip",
               diagnostics=True, adamw_lr=1e-3)  # fmt: skip
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    opt.step()  # skipped and counted
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    bundle = {"params": params, "opt": opt}
    copy_ = pickle.loads(pickle.dumps(bundle)) if how == "pickle" else copy.deepcopy(bundle)
    twin, twin_params = copy_["opt"], copy_["params"]
    assert (twin.nonfinite, twin.nonfinite_skips, twin.diagnostics) == ("skip", 1, True)
    assert twin._adamw_defaults["lr"] == 1e-3 and twin.executor is None
    for ps in (params, twin_params):
        for p, g in zip(ps, (torch.ones(6, 4), torch.ones(4))):
            p.grad = g.clone()
    opt.step()
    twin.step()
    for a, b in zip(params, twin_params):
        assert torch.equal(a, b)
    assert set(twin.stats()) == set(opt.stats())


def test_an_optimizer_pickled_before_the_accel_option_still_steps():
    p = nn.Parameter(torch.randn(6, 4))
    opt = Muon([p])
    del opt.__dict__["accel"]  # as unpickled from an earlier version
    p.grad = torch.randn(6, 4)
    start = p.detach().clone()
    opt.step()
    assert not torch.equal(p, start)
