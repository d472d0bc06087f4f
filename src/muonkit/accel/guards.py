"""A fast test that tensors still have the metadata they had: torch's own tensor guards (``torch.compile`` checks its
compiled code's inputs with them), in C++.

A step plan (``optim.plans._StepPlan``) and the fused kernels' eligibility depend on every tensor's dtype, device,
shape, strides, layout and ``requires_grad``. Reading these from Python costs about 0.1 us per attribute and tensor:
for GPT-2 small's 144 tensors (parameters, gradients, momentum buffers) most of the host time before the step's
first launch. One ``TensorGuards.check`` call tests them all (about 14 us for 144 tensors on a 2-core CPU, against
about 60 us in Python). The guards are a private torch API: where they are missing or do not behave as expected
(checked once, on small tensors), :func:`tensor_guard` returns ``None`` and callers check the tensors themselves.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["available", "tensor_guard"]


def _make(tensors: Sequence[Tensor]) -> Any:
    from torch._C._dynamo.guards import TensorGuards

    guards: Any = TensorGuards  # its stub types the per-tensor size lists as single sizes
    return guards(
        *tensors,
        dynamic_dims_sizes=[list(t.shape) for t in tensors],
        dynamic_dims_strides=[list(t.stride()) for t in tensors],
    )


@functools.cache
def available() -> bool:
    """Whether torch's tensor guards exist here and tell apart what the step plans depend on (tested once)."""
    try:
        x = torch.zeros(3, 2)
        guard = _make([x])
        same = guard.check(torch.ones(3, 2))
        changed = (x.t().contiguous(), x.t(), x.double(), x.to(torch.bfloat16), x[:2], x.to_sparse(), x.unsqueeze(0))
        return bool(same) and not any(guard.check(y) for y in changed) and not guard.check(x.requires_grad_())
    except Exception:
        return False


def tensor_guard(tensors: Sequence[Tensor]) -> Any | None:
    """An object whose ``check(*tensors)`` is true exactly when every tensor has the dtype, device, shape, strides,
    layout (dispatch keys) and ``requires_grad`` its counterpart here has; ``None`` where torch has no such guards."""
    if not available():
        return None
    try:
        return _make(tensors)
    except Exception:
        return None
