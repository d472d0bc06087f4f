"""Non-finite gradients: checked on the host before a step, or on the GPU without a host sync (a repeated fused
step), with the same outcome: the bad step changes nothing, and is counted or raised (``muonkit.optim.nonfinite``)."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from muonkit import Muon, NonFiniteGradientError
from muonkit.optim import nonfinite, stages

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_device_check_flags_each_gradient_and_sets_the_flag():
    flag = torch.zeros(1)
    grads = [torch.ones(3), torch.empty(0), torch.tensor([1.0, float("inf")]).bfloat16(), torch.ones(2, 2)]
    finite = nonfinite.device_check(grads, flag)
    assert finite.tolist() == [True, True, False, True] and flag.item() == 1.0
    finite = nonfinite.device_check([grads[0], grads[1], grads[3]], flag)
    assert finite.tolist() == [True, True, True] and flag.item() == 0.0
    grads[3][1, 0] = float("nan")
    assert nonfinite.device_check(grads[3:], flag).tolist() == [False] and flag.item() == 1.0
    assert nonfinite.device_check([torch.empty(0)], flag).tolist() == [True] and flag.item() == 0.0


def _scanner():
    """``FiniteScan`` where its kernel runs: compiled on CUDA, else in Triton's interpreter on CPU tensors."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and Triton's interpreter is off")
    from muonkit.accel.finite import FiniteScan

    return FiniteScan, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_the_scan_finds_each_non_finite_entry_like_the_multi_tensor_check():
    """``FiniteScan`` (one kernel per dtype over chunks, reading the gradients through an address table) against
    ``device_check``: random NaN/Inf placed at chunk edges and inside, float32 / bf16 / float16 / float64 (1e300
    is finite there), an empty and a channels-last gradient; per gradient the same answer, and the same flag."""
    FiniteScan, device = _scanner()
    g = torch.Generator().manual_seed(3)
    shapes = [((100,), torch.float32), ((7, 9), torch.bfloat16), ((0,), torch.float32), ((300,), torch.float16),
              ((5, 40), torch.float64), ((2, 3, 4, 5), torch.float32), ((64,), torch.float32)]  # fmt: skip
    base = [torch.randn(s, generator=g, dtype=torch.float64).to(dt) for s, dt in shapes]
    base[4] *= 1e300
    base[5] = base[5].to(memory_format=torch.channels_last)
    flag = torch.zeros(1, device=device)
    grads = [t.to(device) for t in base]
    scan = FiniteScan(grads, flag, chunk=64)
    assert sorted(set(scan.owners)) == [0, 1, 3, 4, 5, 6]  # the empty gradient has no chunk
    for trial in range(12):
        grads = [t.clone().to(device) for t in base]  # new addresses every time: the table follows them
        for i in torch.randperm(len(grads), generator=g)[: trial % 4].tolist():
            flat = grads[i].view(-1) if grads[i].is_contiguous() else grads[i].permute(0, 2, 3, 1).reshape(-1)
            if flat.numel():
                at = [0, 63, 64, flat.numel() - 1, int(torch.randint(flat.numel(), (1,), generator=g))][trial % 5]
                flat[min(at, flat.numel() - 1)] = [float("nan"), float("inf"), -float("inf")][trial % 3]
        ok = scan.run(grads).cpu()
        got_flag = flag.item()
        expected = nonfinite.device_check(grads, flag).cpu().tolist()
        per_gradient = [True] * len(grads)
        for owner, good in zip(scan.owners, ok.tolist()):
            per_gradient[owner] &= bool(good)
        assert per_gradient == expected, trial
        assert got_flag == flag.item() == float(not all(expected))


def test_the_scan_takes_only_dense_float_gradients():
    FiniteScan, device = _scanner()
    flag = torch.zeros(1, device=device)
    assert not FiniteScan.applies([torch.zeros(4, 6, device=device)[:, :3]])  # not dense
    assert not FiniteScan.applies([torch.zeros(3, dtype=torch.int64, device=device)])
    assert not FiniteScan.applies([])
    assert FiniteScan.applies([torch.zeros(3, 4, device=device).mT])
    with pytest.raises(ValueError, match="dense float"):
        FiniteScan([torch.zeros(3, dtype=torch.int32, device=device)], flag)
    with pytest.raises(ValueError, match="power of two"):
        FiniteScan([torch.zeros(3, device=device)], flag, chunk=100)


def _adamw_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (7,), (5, 3)]
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    m = [torch.randn(s, generator=g) * 0.1 for s in shapes]
    v = [torch.rand(s, generator=g) * 0.1 for s in shapes]
    steps = [torch.tensor(3.0), torch.tensor(3.0), torch.tensor(1.0)]  # two step counts: two kernel calls
    return params, grads, m, v, steps


@pytest.mark.parametrize("found", [0.0, 1.0])
def test_fused_adamw_changes_nothing_on_found_inf_and_matches_foreach_otherwise(found):
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    ref = _adamw_tensors()
    stages.adamw_step(*ref, **kw)
    got = _adamw_tensors()
    before = copy.deepcopy(got)
    stages.adamw_step(*got, **kw, fused=True, found_inf=torch.tensor([found]))
    assert [float(t) for t in got[4]] == [4.0, 4.0, 2.0]  # the counts advance on the host either way
    for i in (0, 2, 3):  # parameters, first and second moments (not the gradients)
        a, b, c = got[i], ref[i], before[i]
        for x, y, z in zip(a, b, c):
            if found:
                assert torch.equal(x, z)
            else:
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
                assert not torch.equal(x, z)


def test_fused_adamw_applies_only_to_one_cuda_device_and_matching_dtypes():
    p = [torch.zeros(2, 2)]
    assert not stages.fused_adamw_applies(p, [torch.zeros(2, 2)])  # CPU: the foreach form
    assert not stages.fused_adamw_applies([], [])


def _opt(policy):
    named = [("w", torch.nn.Parameter(torch.randn(6, 4))), ("b", torch.nn.Parameter(torch.randn(4)))]
    opt = Muon([{"params": [named[0]]}, {"params": [named[1]], "algorithm": "adamw"}], nonfinite=policy)
    for _, p in named:
        p.grad = torch.ones_like(p)
    return opt, [p for _, p in named]


def _pretend_checked_on_device(opt, params, bad):
    """What a repeated step on the GPU leaves behind (``repeat.step_again``): its kernels skipped every store, the
    AdamW step counts advanced on the host, the per-gradient results on their way to the host."""
    steps = [opt.state[params[1]]["step"]]
    for t in steps:
        t += 1
    flag = np.array([1.0 if bad else 0.0], dtype=np.float32)  # the found_inf value as the step left it
    opt._nonfinite_pending = nonfinite._Pending(flag, torch.tensor([True, not bad]), None, [(0, 0), (1, 0)], steps)


def test_a_bad_step_found_on_the_device_raises_at_the_next_step_and_nothing_changes():
    opt, params = _opt("raise")
    opt.step()
    before = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
    _pretend_checked_on_device(opt, params, bad=True)
    with pytest.raises(NonFiniteGradientError, match=r"'b'.*step\(\) after it"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before[0]))
    assert opt.state[params[1]]["step"].item() == 1.0  # put back
    opt.step()  # the error was raised once; good steps go on
    assert opt.state[params[1]]["step"].item() == 2.0 and opt.nonfinite_skips == 0


def test_per_chunk_results_name_the_gradients_they_cover():
    """A step checked by ``FiniteScan`` leaves per-chunk results: the error names the gradient of each bad chunk."""
    opt, params = _opt("raise")
    opt.step()
    steps = [opt.state[params[1]]["step"]]
    steps[0] += 1
    chunks = torch.tensor([1, 1, 0, 1], dtype=torch.int8)  # gradient 0's two chunks, then gradient 1's two
    flag = np.ones(1, dtype=np.float32)
    opt._nonfinite_pending = nonfinite._Pending(flag, chunks, None, [(0, 0), (1, 0)], steps, owners=[0, 0, 1, 1])
    with pytest.raises(NonFiniteGradientError, match=r"1 parameter\(s\): 'b'"):
        opt.step()
    assert opt.state[params[1]]["step"].item() == 1.0  # put back


def test_a_bad_step_found_on_the_device_is_counted_when_read_and_in_the_state_dict():
    opt, params = _opt("skip")
    opt.step()
    _pretend_checked_on_device(opt, params, bad=True)
    sd = opt.state_dict()  # settles first: counts put back, the skip counted
    assert sd["muonkit"]["nonfinite_skips"] == 1 and sd["state"][1]["step"].item() == 1.0
    _pretend_checked_on_device(opt, params, bad=True)
    assert opt.nonfinite_skips == 2 and opt.state[params[1]]["step"].item() == 1.0
    _pretend_checked_on_device(opt, params, bad=False)
    opt.step()
    assert opt.nonfinite_skips == 2 and opt.state[params[1]]["step"].item() == 3.0


# ---------------------------------------------------------------------------------------------- on a GPU


def _model_params(seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(64, 64), (64, 64), (256, 64), (64, 256), (64, 192)]
    muon = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=g) * 0.02) for s in shapes]
    adamw = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=g) * 0.02) for s in [(100, 64), (64,)]]
    return muon, adamw


def _grads(params, step, bad=False):
    g = torch.Generator(device="cuda").manual_seed(1000 + step)
    for i, p in enumerate(params):
        if p.grad is None:
            p.grad = torch.empty_like(p)
        p.grad.copy_(torch.randn(p.shape, device="cuda", generator=g))  # same tensors: graphs replay
        if bad and i == 3:
            p.grad[0, 0] = float("nan")


def _make(policy):
    muon, adamw = _model_params()
    opt = Muon([{"params": muon}, {"params": adamw, "algorithm": "adamw"}], nonfinite=policy, weight_decay=0.01)
    return opt, muon + adamw


@cuda
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_repeated_gpu_step_with_a_nan_changes_nothing_without_a_host_sync(policy):
    ref, ref_params = _make(policy)
    opt, params = _make(policy)
    for step in range(6):  # both take the same good steps; opt also gets a bad one in between
        if step == 4:
            assert opt._repeat is not None and opt._repeat.found_inf is not None  # the device-checked path
            assert opt._repeat.scan is not None  # by the scan kernel, replayed from a graph
            _grads(params, 99, bad=True)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()  # no host sync, and no error yet
            finally:
                torch.cuda.set_sync_debug_mode("default")
            if policy == "raise":
                _grads(params, step)
                with pytest.raises(NonFiniteGradientError, match=r"param_groups\[0\]\['params'\]\[3\]"):
                    opt.step()
        for o, ps in ((ref, ref_params), (opt, params)):
            _grads(ps, step)
            o.step()
    assert opt.nonfinite_skips == (1 if policy == "skip" else 0)
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    sa, sb = opt.state_dict()["state"], ref.state_dict()["state"]
    for i in sa:
        for key in sa[i]:
            torch.testing.assert_close(sa[i][key], sb[i][key], rtol=0, atol=0)


@cuda
def test_repeated_gpu_step_checks_without_a_host_sync():
    opt, params = _make("raise")
    for step in range(4):
        _grads(params, step)
        opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _grads(params, 4)
        opt.step()  # settles step 3 (already finished: no wait) and checks step 4 on the device
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert opt.nonfinite_skips == 0 and all(torch.isfinite(p).all() for p in params)
