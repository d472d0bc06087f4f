"""Everything that makes muonkit fast on CUDA, in one place, behind one switch; the math runs without it.

- ``kernels``: a Triton symmetric-product kernel for NS's ``X X^T`` and ``a I + b A + c A^2`` (half the FLOPs),
  upper-tile storage for chains of such products, a Frobenius-norm kernel, a tile-size tuner.
- ``fused``: the Muon step's element-wise work (momentum, Nesterov blend, normalisation, scaled update) in three
  Triton kernels per batch of same-shape matrices.
- ``cuda_graphs``: captured NS calls and whole-batch step graphs, replayed.
- ``guards``: torch's C++ tensor guards, which let a repeated step skip re-checking every tensor.

The switch: ``Muon(..., accel=False)`` runs the step in plain torch (cuBLAS products, torch element-wise ops, no
graphs, no Triton, no tuning at construction). ``accel=None`` (the default) reads ``MUONKIT_ACCEL`` when the
optimizer is built: ``0``, ``false`` or ``off`` mean ``False``, anything else (or unset) ``True``. Outside an
optimizer, ``with muonkit.accel.disabled():`` does the same for ``orthogonalize`` calls. Results of the two paths
agree to rounding (the torch path is the reference the tests compare against). On CPU none of this applies.

Finer settings for benchmarks and maintainers (not a user interface): ``kernels.set_mode``,
``fused.set_fused``, ``cuda_graphs.set_cuda_graphs``, ``kernels.UPPER``, ``kernels.EVEN``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from . import cuda_graphs, fused, guards, kernels

__all__ = ["ENV", "cuda_graphs", "disabled", "from_env", "fused", "guards", "kernels"]

ENV = "MUONKIT_ACCEL"
OFF = ("0", "false", "off")


def from_env() -> bool:
    """Whether ``MUONKIT_ACCEL`` leaves acceleration on (unset or any value but 0 / false / off)."""
    return os.environ.get(ENV, "1").strip().lower() not in OFF


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Plain torch inside the block: no Triton kernels, fused passes or CUDA graphs. The previous
    settings come back on exit."""
    saved = (kernels._mode, fused._enabled, cuda_graphs._enabled)
    kernels._mode, fused._enabled, cuda_graphs._enabled = "torch", False, False
    try:
        yield
    finally:
        kernels._mode, fused._enabled, cuda_graphs._enabled = saved
