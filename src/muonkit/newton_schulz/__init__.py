"""``orthogonalize``: approximate polar factor by odd-polynomial Newton-Schulz iterations.

For ``G = U S V^T`` the polar factor is ``U V^T``. Newton-Schulz (NS) never forms the SVD: after
scaling ``G`` so every singular value lies in ``(0, 1]`` it applies, per step, an odd polynomial to
the singular values using matrix products only (Jordan 2024; Bernstein & Newhouse 2024):

    A = X X^T
    X = a X + (b A + c A^2 + ...) X          # f(x) = a x + b x^3 + c x^5 + ... on each singular value

The input is transposed so that ``X`` has at most as many rows as columns, which makes ``A`` the
smaller of the two Gram matrices.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..coefficients import CoefficientSpec, as_preset
from ..reference import polar_svd
from .calls import NSCall, filled_graph_key, orthogonalize_filled, orthogonalize_stack
from .iteration import (
    GRAM_MIN_ASPECT,
    GRAM_MIN_WORK,
    METHODS,
    NS_DTYPES,
    Restarts,
    default_ns_dtype,
    gram_restarts,
    newton_schulz_plain,
    restart_positions,
    uses_gram,
)

__all__ = [
    "GRAM_MIN_ASPECT",
    "GRAM_MIN_WORK",
    "METHODS",
    "NS_DTYPES",
    "NSCall",
    "default_ns_dtype",
    "filled_graph_key",
    "gram_restarts",
    "newton_schulz_plain",
    "orthogonalize",
    "orthogonalize_filled",
    "orthogonalize_stack",
    "restart_positions",
    "uses_gram",
]


def orthogonalize(
    G: Tensor,
    coefficients: CoefficientSpec = "jordan",
    steps: int | None = None,
    *,
    method: str = "auto",
    dtype: torch.dtype | None = None,
    eps: float = 1e-7,
    restarts: Restarts = None,
) -> Tensor:
    """Approximate polar factor ``U V^T`` of every matrix in ``G``.

    Args:
        G: tensor of shape ``(..., m, n)``; every leading index is an independent matrix.
        coefficients: a preset name (see ``muonkit.coefficients.list_presets()``), a ``Preset``,
            one row ``(a, b, c, ...)`` or a sequence of per-step rows. Any odd degree >= 3.
        steps: number of NS steps; ``None`` means the preset's own default (5 for fixed presets).
            A schedule shorter than ``steps`` repeats its last row.
        method: ``"auto"`` (default: ``"gram"`` on CUDA for batches of matrices at least twice as wide as
            tall and large enough, where it was measured faster; ``"newton_schulz"`` otherwise, and on every
            other device; :func:`uses_gram`), ``"newton_schulz"``, ``"gram"`` (the same polynomials
            iterated on the Gram matrix: fewer FLOPs for rectangular inputs, equal to plain NS up to rounding)
            or ``"svd"`` (exact polar factor).
        dtype: precision of the NS matrix products. ``None``: bfloat16 on CUDA, float32 elsewhere
            (float64 input stays float64). Normalisation is always done in at least float32.
        eps: added to the Frobenius norm before dividing (a zero matrix maps to zero).
        restarts: where Gram NS runs (``method="gram"``, or ``"auto"``): the steps (1 to ``steps - 1``) before which X
            is re-formed and R recomputed. ``None``: :func:`gram_restarts` of the step count ((3,) for 5 steps, chosen
            by measurement; Dao-AILab's gram-newton-schulz uses (2,), which was up to 12x less accurate than plain NS on
            ill-conditioned inputs in bf16, ``gram_restarts_sweep_768x3072_h100.json`` in ``benchmarks/dev/results``).
            Checked for every method: a position outside the schedule raises ``ValueError``.

    Returns:
        A tensor of ``G``'s shape and dtype.
    """
    if not isinstance(G, Tensor):
        raise TypeError(f"orthogonalize expects a torch.Tensor, got {type(G).__name__}")
    if G.ndim < 2:
        raise ValueError(f"orthogonalize needs a matrix or a batch of matrices (..., m, n); got shape {tuple(G.shape)}")
    if G.is_complex():
        raise ValueError("orthogonalize supports real tensors only; got a complex tensor")
    if not G.is_floating_point():
        raise TypeError(f"orthogonalize needs a floating-point tensor, got {G.dtype}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if dtype is not None and dtype not in NS_DTYPES:
        raise ValueError(f"dtype must be one of {NS_DTYPES} or None, got {dtype}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")

    if method == "svd":
        return polar_svd(G, dtype)

    preset = as_preset(coefficients)
    rows = preset.schedule(steps)
    if G.numel() == 0:
        return G.clone()
    ns_dtype = dtype or default_ns_dtype(G.device, G.dtype)
    m, n = G.shape[-2:]
    call = NSCall.of(rows, preset.norm_scale, eps, ns_dtype, method, restarts)
    X = call.run(G.reshape(-1, m, n), fresh=G.dtype == ns_dtype)
    return X.reshape(G.shape).to(G.dtype)  # a copy unless fresh
