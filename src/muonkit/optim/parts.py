"""The matrices Muon orthogonalizes for one parameter: its matrix view and its split into parts.

A parameter of more than two dims is either flattened to ``(out, in * k * ...)`` (``matrix_view="flatten"``: conv
kernels) or kept as a batch of matrices over its leading dims (``"batch"``: MoE expert stacks). ``split`` then cuts
each matrix into parts orthogonalized separately:

* ``k`` or ``[r1, r2, ...]`` - row blocks (dim -2): fused Q, K and V (``3``), or every attention head's rows of a
  Q/K/V projection (``heads``, or ``3 * heads`` for a fused QKV);
* ``{"rows": ..., "cols": ...}`` - row blocks, column blocks (dim -1) or both (a grid, row-major): the output
  projection of attention per head is ``{"cols": heads}`` (its input features are the heads' outputs).

Row parts of a contiguous tensor are contiguous (``matrix_offsets`` locates them for the fused CUDA step); column
parts are strided views, which the torch path stacks like any other matrices.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

from torch import Tensor

__all__ = [
    "SplitSpec",
    "matrix_offsets",
    "matrix_parts",
    "row_state_parts",
    "row_state_shape",
    "split_axes",
    "split_key",
    "split_sizes",
]

Sizes = int | Sequence[int] | None
SplitSpec = Sizes | Mapping[str, Sizes]
_AXES = ("rows", "cols")


def split_axes(split: SplitSpec) -> tuple[Sizes, Sizes]:
    """``(row split, column split)`` of a ``split`` (an int or a list: rows only)."""
    if isinstance(split, Mapping):
        unknown = [k for k in split if k not in _AXES]
        if unknown or not split:
            raise ValueError(f"a split given as a mapping takes the keys 'rows' and/or 'cols', got {dict(split)!r}")
        return split.get("rows"), split.get("cols")
    return split, None


def split_key(split: SplitSpec) -> Hashable:
    """``split`` as a hashable value (lists as tuples, a mapping as sorted pairs), equal for equal splits."""
    if isinstance(split, Mapping):
        return tuple(sorted((axis, split_key(sizes)) for axis, sizes in split.items()))
    return tuple(split) if isinstance(split, list | tuple) else split


def split_sizes(split: Sizes, size: int, axis: str = "rows") -> list[int]:
    """Sizes of the parts that ``size`` rows (or columns: ``axis="cols"``) are cut into (``[size]`` when not split)."""
    what = "columns" if axis == "cols" else "rows"
    if split is None:
        return [size]
    if isinstance(split, bool | str | Mapping):
        raise ValueError(f"split must be None, an int or a list of {what[:-1]} counts, got {split!r}")
    if isinstance(split, int):
        if split < 1 or size % split:
            raise ValueError(f"split={split}: {size} {what} cannot be cut into {split} equal parts")
        return [size // split] * split
    sizes = [int(s) for s in split]
    if any(s < 1 for s in sizes) or sum(sizes) != size:
        raise ValueError(f"split={list(split)}: part sizes must be positive and add up to the {size} {what}")
    return sizes


def _view(shape: Sequence[int], matrix_view: str) -> tuple[int, ...]:
    """The shape of a parameter's matrix view (a flattened conv kernel is ``(out, in * k * ...)``)."""
    if len(shape) > 2 and matrix_view == "flatten":
        return (shape[0], math.prod(shape[1:]))
    return tuple(shape)


def matrix_parts(u: Tensor, matrix_view: str, split: SplitSpec) -> list[Tensor]:
    """The matrices Muon orthogonalizes for one parameter-shaped update ``u``, as views of ``u`` (row parts,
    then within each row part its column parts)."""
    u = u.reshape(_view(u.shape, matrix_view))  # the same shape (a view of u itself) unless a kernel is flattened
    rows, cols = split_axes(split)
    by_rows = u.split(split_sizes(rows, u.shape[-2]), dim=-2)
    if cols is None:
        return list(by_rows)
    widths = split_sizes(cols, u.shape[-1], "cols")
    return [part for block in by_rows for part in block.split(widths, dim=-1)]


def matrix_offsets(shape: Sequence[int], matrix_view: str, split: SplitSpec) -> list[tuple[int, int, list[int]]]:
    """Where the matrices of ``matrix_parts`` lie in a contiguous tensor of ``shape``: per part, ``(rows, cols,
    element offsets of its matrices)`` (one offset per leading index of a ``"batch"`` view), each matrix
    row-contiguous. Arithmetic only: no tensor is looked at (``storage_offset()`` would break a ``torch.compile``
    graph). Column parts are not row-contiguous: a split with columns is refused."""
    row_split, col_split = split_axes(split)
    if col_split is not None:
        raise ValueError("column parts are strided views: they have no row-contiguous offsets")
    view = _view(shape, matrix_view)
    rows, cols = view[-2], view[-1]
    count = math.prod(view[:-2])
    parts, r0 = [], 0
    for r in split_sizes(row_split, rows):
        parts.append((r, cols, [e * rows * cols + r0 * cols for e in range(count)]))
        r0 += r
    return parts


def row_state_shape(shape: Sequence[int], matrix_view: str, split: SplitSpec = None) -> tuple[int, ...]:
    """The shape of a ``rows_state`` stage's state (``pipeline``) for a parameter of ``shape``: one number per row
    of each of its matrices (a conv kernel's output channels; a ``"batch"`` view's leading dims kept), one column
    per column part of ``split``."""
    view = _view(shape, matrix_view)
    col_split = split_axes(split)[1]
    return (*view[:-1], len(split_sizes(col_split, view[-1], "cols")))


def row_state_parts(state: Tensor, split: SplitSpec) -> list[Tensor]:
    """The views of a state of ``row_state_shape`` that belong to each matrix of ``matrix_parts``, in its order."""
    row_split, col_split = split_axes(split)
    by_rows = state.split(split_sizes(row_split, state.shape[-2]), dim=-2)
    if col_split is None:
        return list(by_rows)
    return [part for block in by_rows for part in block.split(1, dim=-1)]
