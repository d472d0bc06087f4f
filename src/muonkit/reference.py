"""Slow, obviously-correct references that the fast paths are tested against.

* ``polar_svd``: the exact polar factor ``U V^T`` by SVD (what Newton-Schulz approximates).
* ``newton_schulz_loop``: Newton-Schulz one matrix at a time in float64, written as the textbook
  formula, for checking the batched implementation.
* ``muon_reference_step``: one Muon step on a list of 2-D parameters written as a plain loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["muon_reference_step", "newton_schulz_loop", "polar_svd"]


def polar_svd(G: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Exact polar factor of every matrix in ``G`` (shape ``(..., m, n)``) by SVD.

    For ``G = U S V^T`` returns ``U V^T`` restricted to the numerically non-zero singular values,
    so a rank-deficient input gives the partial isometry ``U_r V_r^T`` (the limit Newton-Schulz
    converges to, since odd polynomials keep zero singular values at zero); a zero matrix gives zero.
    Computed in float64 for float64 input, else float32 (or ``dtype`` if it is one of those two);
    returned in the input's dtype.
    """
    if dtype not in (None, torch.float32, torch.float64):
        dtype = torch.float32
    work = dtype or (torch.float64 if G.dtype == torch.float64 else torch.float32)
    if G.numel() == 0:
        return G.clone()
    U, S, Vh = torch.linalg.svd(G.to(work), full_matrices=False)
    m, n = G.shape[-2:]
    tol = S.amax(dim=-1, keepdim=True) * max(m, n) * torch.finfo(work).eps
    keep = (tol < S).to(work)
    return ((U * keep.unsqueeze(-2)) @ Vh).to(G.dtype)


def newton_schulz_loop(
    G: Tensor, rows: Sequence[Sequence[float]], eps: float = 1e-7, norm_scale: float = 1.0
) -> Tensor:
    """Newton-Schulz on a single 2-D matrix in float64, literally ``X <- sum_i c_i (X X^T)^i X``."""
    if G.ndim != 2:
        raise ValueError("newton_schulz_loop takes one 2-D matrix")
    X = G.to(torch.float64)
    transposed = X.shape[0] > X.shape[1]
    if transposed:
        X = X.T
    X = X / (norm_scale * torch.linalg.norm(X) + eps)
    for row in rows:
        A = X @ X.T
        new = torch.zeros_like(X)
        power = X
        for coef in row:
            new = new + coef * power
            power = A @ power
        X = new
    if transposed:
        X = X.T
    return X.to(G.dtype)


def muon_reference_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bufs: Sequence[Tensor],
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    rows: Sequence[Sequence[float]],
    eps: float = 1e-7,
    adjust: str | None = "original",
    precondition: Callable[[Tensor], Tensor] | None = None,
    postscale: Callable[[Tensor], Tensor] | None = None,
    update: Callable[[Tensor, Tensor, float, float], None] | None = None,
) -> None:
    """One Muon step on 2-D parameters, as a plain loop (float64 Newton-Schulz).

    ``buf <- mu buf + (1 - mu) g``; update ``g + mu (buf - g)`` with Nesterov else ``buf``;
    ``p <- p (1 - lr wd) - lr_adj NS(update)``. ``precondition`` / ``postscale`` (one matrix -> one matrix) and
    ``update`` (``update(p, lr_adj * O, lr, wd)``, in place): the references of the pipeline's stages in those
    slots (``muonkit.optim.pipeline``), where a step uses other stages than the defaults.
    """
    with torch.no_grad():
        for p, g, buf in zip(params, grads, bufs):
            buf.mul_(momentum).add_(g, alpha=1 - momentum)
            u = g + momentum * (buf - g) if nesterov else buf
            if precondition is not None:
                u = precondition(u)
            O = newton_schulz_loop(u, rows, eps)
            if postscale is not None:
                O = postscale(O)
            rows_, cols_ = p.shape
            if adjust == "original":
                scale = math.sqrt(max(1.0, rows_ / cols_))
            elif adjust == "match_rms_adamw":
                scale = 0.2 * math.sqrt(max(rows_, cols_))
            else:
                scale = 1.0
            if update is not None:
                update(p, lr * scale * O, lr, weight_decay)
                continue
            p.mul_(1 - lr * weight_decay)
            p.add_(O.to(p.dtype), alpha=-lr * scale)
