"""``muonkit.optim.parts``: the matrices of a parameter (its view and its split into row and column parts), the
row state that belongs to each, and a split's refusal messages."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_cuda_steps_match_cpu
from muonkit import Muon, orthogonalize
from muonkit.optim import options
from muonkit.optim.parts import (
    matrix_offsets,
    matrix_parts,
    row_state_parts,
    row_state_shape,
    split_key,
)

F64 = torch.float64


@pytest.mark.parametrize(
    "shape, view, split, blocks",
    [
        ((6, 8), "flatten", {"cols": 2}, [(slice(0, 6), slice(0, 4)), (slice(0, 6), slice(4, 8))]),
        ((6, 8), "flatten", {"cols": [3, 5]}, [(slice(0, 6), slice(0, 3)), (slice(0, 6), slice(3, 8))]),
        ((6, 8), "flatten", {"rows": [2, 4], "cols": 2},
         [(slice(0, 2), slice(0, 4)), (slice(0, 2), slice(4, 8)),
          (slice(2, 6), slice(0, 4)), (slice(2, 6), slice(4, 8))]),
        ((6, 8), "flatten", {"rows": 3},
         [(slice(0, 2), slice(0, 8)), (slice(2, 4), slice(0, 8)), (slice(4, 6), slice(0, 8))]),
    ],
)  # fmt: skip
def test_parts_are_the_row_and_column_blocks_in_row_major_order(shape, view, split, blocks):
    t = torch.arange(48.0).view(shape)
    parts = matrix_parts(t, view, split)
    assert len(parts) == len(blocks)
    for part, (r, c) in zip(parts, blocks):
        assert torch.equal(part, t[r, c]) and part.data_ptr() == t[r, c].data_ptr()  # views, not copies


def test_a_batch_view_and_a_flattened_kernel_are_split_per_matrix():
    stack = torch.randn(3, 4, 6)
    parts = matrix_parts(stack, "batch", {"cols": 2})
    assert [tuple(p.shape) for p in parts] == [(3, 4, 3), (3, 4, 3)]
    assert torch.equal(parts[1], stack[..., 3:])
    kernel = torch.randn(4, 2, 3, 3)
    parts = matrix_parts(kernel, "flatten", {"cols": [6, 12]})
    assert torch.equal(parts[1], kernel.reshape(4, 18)[:, 6:])


@pytest.mark.parametrize("split", [None, 2, {"cols": 3}, {"rows": 2, "cols": [2, 4]}])
def test_each_part_gets_the_row_state_of_its_own_rows(split):
    shape = (4, 6)
    state = torch.arange(float(torch.Size(row_state_shape(shape, "flatten", split)).numel()))
    state = state.view(row_state_shape(shape, "flatten", split))
    parts, states = matrix_parts(torch.empty(shape), "flatten", split), row_state_parts(state, split)
    assert len(states) == len(parts) and len(set(s.data_ptr() for s in states)) == len(states)
    assert all(s.shape == (p.shape[0], 1) for p, s in zip(parts, states))


def test_row_state_shapes():
    assert row_state_shape((6, 8), "flatten") == (6, 1)
    assert row_state_shape((6, 8), "flatten", {"cols": 4}) == (6, 4)
    assert row_state_shape((2, 6, 8), "batch", {"rows": 3, "cols": 2}) == (2, 6, 2)
    assert row_state_shape((4, 2, 3, 3), "flatten") == (4, 1)


def test_offsets_exist_only_for_row_parts():
    assert matrix_offsets((6, 8), "flatten", {"rows": [2, 4]}) == matrix_offsets((6, 8), "flatten", [2, 4])
    with pytest.raises(ValueError, match="strided"):
        matrix_offsets((6, 8), "flatten", {"cols": 2})


def test_split_keys_are_hashable_and_equal_for_equal_splits():
    assert split_key({"cols": [3, 5], "rows": 2}) == split_key({"rows": 2, "cols": (3, 5)})
    assert split_key([2, 4]) == (2, 4) and split_key(None) is None
    assert split_key({"cols": 2}) != split_key(2)
    group = {**options.DEFAULTS, "split": {"cols": [3, 5]}}
    hash(options.plan_key(group))


@pytest.mark.parametrize(
    "split, match",
    [
        ({"heads": 2}, "keys 'rows' and/or 'cols'"),
        ({}, "keys 'rows' and/or 'cols'"),
        ({"cols": 5}, "8 columns cannot be cut into 5"),
        ({"cols": [3, 4]}, "add up to the 8 columns"),
        ({"rows": 4}, "6 rows cannot be cut into 4"),
        ({"cols": "2"}, "list of column counts"),
    ],
)
def test_a_bad_split_is_refused_by_muon_naming_the_parameter(split, match):
    p = torch.nn.Parameter(torch.randn(6, 8))
    with pytest.raises(ValueError, match=r"parameter .* of shape \(6, 8\): .*" + match):
        Muon([{"params": [p], "split": split}])


@pytest.mark.parametrize("split", [{"cols": 2}, {"cols": [2, 6, 4]}, {"rows": 3, "cols": 2}])
def test_muon_orthogonalizes_each_column_part_on_its_own(split):
    """The update of a per-head output projection is the polar factor of each head's column block, not of the
    whole matrix (torch path, float64 NS)."""
    g = torch.randn(15, 12, dtype=F64, generator=torch.Generator().manual_seed(0))
    p = torch.nn.Parameter(torch.zeros(15, 12, dtype=F64))
    opt = Muon([p], lr=1.0, momentum=0.0, nesterov=False, adjust_lr=None, ns_dtype=F64, momentum_dtype=None,
               split=split)  # fmt: skip
    p.grad = g
    opt.step()
    want = torch.zeros_like(g)
    for src, dst in zip(matrix_parts(g, "flatten", split), matrix_parts(want, "flatten", split)):
        dst.copy_(orthogonalize(src, dtype=F64))
    torch.testing.assert_close(-p.detach(), want, atol=1e-12, rtol=0)
    whole = orthogonalize(g, dtype=F64)
    assert (-p.detach() - whole).abs().max() > 0.1  # not the whole matrix's polar factor


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_column_parts_on_cuda_match_the_cpu_step_beside_a_fused_group():
    """On CUDA a group with column parts takes the torch path (strided parts), a row-split group beside it the
    fused step; both give the CPU's steps."""
    assert_cuda_steps_match_cpu(
        [(64, 96), (96, 64)], lambda ps: [{"params": [ps[0]], "split": {"cols": 4}}, {"params": [ps[1]], "split": 2}]
    )
