"""Step plans and what they are keyed on, without Triton: tensor guards, the remembered-plan key, lane balancing,
graph keys, where the fused kernels apply, and how matrices are located in their tensors. (The fused kernels
themselves, and plans run through them, are in ``test_fused.py``, which needs Triton.)"""

from __future__ import annotations

import pytest
import torch

from muonkit.accel import fused
from muonkit.optim import functional, plans, remembered
from muonkit.optim.parts import matrix_offsets, matrix_parts

CUDA = torch.cuda.is_available()


def test_tensor_guards_tell_apart_what_plans_depend_on():
    """The guard a remembered plan keeps: true for tensors with the same metadata (any values, any addresses),
    false for another dtype, shape, stride, layout, device or requires_grad."""
    from muonkit.accel import guards as _guards

    assert _guards.available()  # the torch this project supports has them; the fallback is tested above
    ts = [torch.randn(6, 4), torch.zeros(4, 4, dtype=torch.bfloat16)]
    guard = _guards.tensor_guard(ts)
    assert guard.check(torch.ones(6, 4), torch.ones(4, 4, dtype=torch.bfloat16))
    others = [torch.ones(6, 4, dtype=torch.float64), torch.ones(4, 6).t(), torch.ones(4, 6),
              torch.ones(6, 4).to_sparse(), torch.ones(6, 4, requires_grad=True), torch.ones(12, 4)[::2]]  # fmt: skip
    if CUDA:
        others.append(torch.ones(6, 4, device="cuda"))
    for other in others:
        assert not guard.check(other, ts[1]), other
    assert not guard.check(ts[0], ts[1].float())


def _key(calls):
    return remembered._state_key(calls, plans._streams(calls))


def test_state_key_follows_switches_structure_and_grad_mode():
    """What besides tensor metadata decides a remembered plan: options other than lr/momentum/weight decay,
    the kernel switches and grad mode."""
    from muonkit.accel import kernels

    p = [torch.randn(8, 4)]
    opts = {**functional._STEP_DEFAULTS, **dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0,
            coefficients="jordan", ns_steps=5, adjust_lr="original", eps=1e-7)}  # fmt: skip
    key = _key([(p, p, p, opts)])
    assert key == _key([(p, p, p, {**opts, "lr": 0.5, "momentum": 0.5})])
    for change in (dict(ns_steps=4), dict(nesterov=False), dict(weight_decay=0.1), dict(coefficients="polar_express"),
                   dict(method="gram"), dict(eps=0.0), dict(split=2), dict(max_batch=3)):  # fmt: skip
        assert _key([(p, p, p, {**opts, **change})]) != key, change
    with torch.no_grad():  # as in Muon.step
        quiet = _key([(p, p, p, opts)])
    with torch.enable_grad():
        assert _key([(p, p, p, opts)]) != quiet
    kernels.set_mode("torch")
    try:
        assert _key([(p, p, p, opts)]) != key
    finally:
        kernels.set_mode("auto")
    fused.set_fused(False)
    try:
        assert _key([(p, p, p, opts)]) != key
    finally:
        fused.set_fused(True)


def test_graph_keys_hash_once_and_equal_their_tuples():
    from muonkit.accel import cuda_graphs

    parts = (1, (2, (3, 4)), "x")
    key = cuda_graphs.Key(parts)
    assert key == parts and hash(key) == hash(parts) and {parts: 1}[key] == 1
    assert {key: 2}[parts] == 2 and key != cuda_graphs.Key((1, (2, (3, 5)), "x"))


def test_applies_only_where_the_kernels_can_run():
    p = torch.randn(8, 8)
    assert not fused.applies([p], torch.float32)  # CPU
    if CUDA:
        q = torch.randn(8, 8, device="cuda")
        assert fused.applies([q], torch.bfloat16)
        assert not fused.applies([q.mT[:, :4]], torch.bfloat16)  # not contiguous
        assert not fused.applies([q.double()], torch.bfloat16)
        assert not fused.applies([q], torch.float64)
        fused.set_fused(False)
        try:
            assert not fused.applies([q], torch.bfloat16)
        finally:
            fused.set_fused(True)


@pytest.mark.parametrize(
    "shape,view,split", [((6, 5), "flatten", [2, 4]), ((2, 6, 5), "batch", [2, 4]), ((4, 2, 3, 3), "flatten", 2),
                         ((3, 4, 5), "batch", None)],
)  # fmt: skip
def test_matrix_offsets_locate_every_matrix_of_matrix_parts(shape, view, split):
    t = torch.arange(float(torch.Size(shape).numel())).view(shape)
    parts = matrix_parts(t, view, split)
    located = matrix_offsets(shape, view, split)
    assert len(located) == len(parts)
    for part, (r, c, offsets) in zip(parts, located):
        want = list(part.reshape(-1, r, c).unbind(0))
        got = fused.Matrices([t], [0] * len(offsets), offsets, r, c).views()
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
