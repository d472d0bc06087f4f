"""The Newton-Schulz iterations themselves, on a batch ``X`` of shape ``(b, m, n)`` with ``m <= n``.

``newton_schulz_plain`` is the formula as written, in plain torch (``A = X X^T``; ``X = a X + (b A + c A^2) X``);
``_newton_schulz`` is the same iteration with the symmetric-product kernel of ``muonkit.accel.kernels`` where it
applies, and ``_gram_newton_schulz`` the same polynomials iterated on the Gram matrix. Also here: the NS
precision's default, the Frobenius normalisation and Gram NS's restart positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..accel import fused, kernels

__all__ = ["GRAM_MIN_ASPECT", "GRAM_MIN_WORK", "METHODS", "NS_DTYPES", "Restarts", "default_ns_dtype", "gram_restarts",
           "newton_schulz_plain", "restart_positions", "uses_gram"]  # fmt: skip

METHODS = ("auto", "newton_schulz", "gram", "svd")
# method="auto": Gram NS on CUDA for a (b, m, n) batch (m <= n) with n >= GRAM_MIN_ASPECT m and b m n^2 >= GRAM_MIN_WORK
GRAM_MIN_ASPECT = 2.0
GRAM_MIN_WORK = 7e9
Restarts = Sequence[int] | None
NS_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def default_ns_dtype(device: torch.device, input_dtype: torch.dtype) -> torch.dtype:
    """The NS precision used when ``dtype=None``: bfloat16 on CUDA, otherwise float32.

    Measured on a 2-core CPU (torch 2.13): bf16 matmuls of NS-sized matrices are 7-27x slower than
    float32, so half precision only pays on GPUs. float64 input keeps float64 off-GPU.
    """
    if device.type == "cuda":
        return torch.bfloat16
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def uses_gram(method: str, shape: Sequence[int], device: torch.device) -> bool:
    """Whether ``method`` iterates on the Gram matrix for a batch of ``shape`` (``(..., m, n)``) on ``device``.

    ``"gram"``: for every rectangular matrix. ``"auto"`` (the default): on CUDA for batches of ``b`` matrices,
    ``m x n`` with ``m <= n`` (or transposed), where ``n >= GRAM_MIN_ASPECT * m`` and ``b m n^2 >= GRAM_MIN_WORK``:
    the region where Gram NS took less time than plain NS in every measured case (H200, bf16, Jordan x5;
    ``benchmarks/dev/gram_aspect.py``; single matrices up to ``1024 x 2560`` were up to 12% slower with it).
    Plain NS for square, near-square and small batches and on every other device (so CPU results are plain
    NS's, bit for bit).
    """
    *lead, m, n = shape
    m, n = min(m, n), max(m, n)
    if m == n:
        return False
    if method == "gram":
        return True
    b = math.prod(lead)
    return method == "auto" and device.type == "cuda" and n >= GRAM_MIN_ASPECT * m and b * m * n * n >= GRAM_MIN_WORK


def gram_restarts(steps: int) -> tuple[int, ...]:
    """Gram NS's default restart positions for a schedule of ``steps`` steps (``restarts=None``).

    A restart re-forms ``X = Q X`` and ``R = X X^T`` before that step: R's rounding errors in half precision
    (negative eigenvalues below the rounding level grow by about ``a^2`` per step) start again from zero.
    Chosen by ``benchmarks/dev/gram_restarts.py --sweep`` (H100, bf16, ``4 x 768 x 3072`` and ``4 x 1024 x 2048``;
    Jordan's and Polar Express's coefficients; Gaussian, log-spread (singular values over [1e-4, 1]) and
    low-rank inputs; score: the worst ratio of the error against float64 to plain NS's in bf16): the one
    restart with the best score for 3 to 6 steps ((2,) for 3 steps, (3,) for 4-6; five steps: 1.81-1.84 against
    10.4-12.0 for Dao-AILab's (2,), at the same cost), and two from 7 steps ((3, 5): 1.32-2.04 for 7 and 8; one
    restart reached 19-1.2e9 there); every second step after step 3 beyond that. Two restarts ((2, 4): 1.24-1.42
    at 5 steps) are more accurate still and cost one more ``m x n`` product pair.
    """
    if steps <= 2:
        return ()
    if steps == 3:
        return (2,)
    if steps <= 6:
        return (3,)
    return tuple(range(3, steps, 2))


def restart_positions(restarts: Restarts, steps: int) -> tuple[int, ...]:
    """``restarts`` checked against a schedule of ``steps`` steps (``None``: :func:`gram_restarts`)."""
    if restarts is None:
        return gram_restarts(steps)
    positions = tuple(restarts)
    for r in positions:
        if isinstance(r, bool) or not isinstance(r, int) or not 0 < r < steps:
            raise ValueError(
                f"restarts must be step indices between 1 and {steps - 1} (the schedule has {steps} steps), "
                f"got {positions}"
            )
    return tuple(sorted(set(positions)))


def _frobenius_normalise(G: Tensor, norm_scale: float, eps: float, ns_dtype: torch.dtype) -> Tensor:
    """``G / (norm_scale * ||G||_F + eps)`` per matrix, written straight into a new ``ns_dtype`` tensor.

    Two passes over G: the norm is accumulated in float64 (squares of any float32 value fit, so no
    overflow or underflow for entries between 1e-30 and 1e38; ``kernels.frobenius_norms``) and the
    division rounds once into the NS precision.
    """
    X = fused.frobenius_normalise(G, norm_scale, eps, ns_dtype)  # three kernels on CUDA, where they apply
    if X is not None:
        return X
    norm = kernels.frobenius_norms(G)
    denom = norm_scale * norm + eps
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))  # eps = 0 and G = 0: stay 0
    denom = denom.to(torch.float64 if ns_dtype == torch.float64 else torch.float32)
    if G.requires_grad and torch.is_grad_enabled():  # out= does not record autograd
        return (G / denom).to(ns_dtype)
    X = torch.empty(G.shape, dtype=ns_dtype, device=G.device)
    return torch.div(G, denom, out=X)


def _poly_in_gram(A: Tensor, higher: Sequence[float]) -> Tensor:
    """``B = b A + c A^2 + d A^3 + ...`` for ``higher = (b, c, d, ...)`` (at least two terms), by Horner
    ``B = A (b + A (c + A d))`` with the scalars folded into the matrix products (``baddbmm``)."""
    B = torch.baddbmm(A, A, A, beta=higher[-2], alpha=higher[-1])
    for coef in reversed(higher[:-2]):
        B = torch.baddbmm(A, A, B, beta=coef)
    return B


def _polynomial(
    A: Tensor, coefs: Sequence[float], upper_in: bool = False, upper_out: bool = False
) -> tuple[Tensor, float, float]:
    """``(Z, a, s)`` with ``a I + s Z = a I + b A + c A^2 + ...`` for ``coefs = (a, b, c, ...)``, A symmetric.

    For quintics where the Triton kernel applies, ``Z`` is the whole polynomial ``c A A^T + b A + a I``
    (one kernel, float32 epilogue, one rounding) and ``a = 0``: the following product is then a plain
    ``bmm``. The torch path keeps ``a`` apart and adds it in the next product's float32 epilogue
    (``baddbmm``): folding it into a half-precision ``Z`` first rounds twice and was measured 1.5-2.5x
    less accurate in bf16 (2-core CPU, Jordan's quintic, 64-1024 columns).

    ``upper_in`` / ``upper_out``: A / Z stored in upper tiles only (``kernels.sym_product``); only for
    quintics on the kernel (``_upper_chain``).
    """
    a, *higher = coefs
    if len(higher) == 1:
        return A, a, higher[0]
    P = _kernel_polynomial(A, coefs, upper_in=upper_in, upper_out=upper_out)
    if P is not None:
        return P, 0.0, 1.0
    return _poly_in_gram(A, higher), a, 1.0


def _kernel_polynomial(
    A: Tensor, coefs: Sequence[float], divisor: Tensor | None = None, upper_in: bool = False, upper_out: bool = False
) -> Tensor | None:
    """The whole quintic polynomial ``(c A A + b A + a I) / divisor`` in one symmetric-product kernel call, where
    the Triton kernel takes it; ``None`` elsewhere (other degrees, or no kernel). ``upper_in`` / ``upper_out``:
    A / the result stored in upper tiles only (``kernels.sym_product``)."""
    a, *higher = coefs
    if len(higher) == 2 and kernels.use_kernel(A, has_y=True):
        return kernels.sym_product(
            A, alpha=higher[1], beta=higher[0], Y=A, diag=a, divisor=divisor, upper_in=upper_in, upper_out=upper_out
        )
    return None


def _upper_chain(X: Tensor, rows: Sequence[Sequence[float]]) -> bool:
    """Whether NS on ``X`` (``(b, m, n)``, m <= n) may keep its ``m x m`` intermediates in upper tiles only:
    quintic rows (the kernel makes the whole polynomial) and the kernel taking every ``m x m`` product. Saves
    the mirror writes and half the reads of those products; the matrices that cuBLAS multiplies X by are
    written whole."""
    return all(len(r) == 3 for r in rows) and kernels.upper_chain(X[..., : X.shape[-2]])


def _times(M: Tensor, poly: tuple[Tensor, float, float]) -> Tensor:
    """``(a I + s Z) M`` for ``poly = (Z, a, s)``."""
    Z, a, s = poly
    if a == 0:
        return Z @ M if s == 1 else torch.bmm(Z, M).mul_(s)
    return torch.baddbmm(M, Z, M, beta=a, alpha=s)


def _times_symmetric(
    M: Tensor, poly: tuple[Tensor, float, float], divisor: Tensor | None = None, upper: bool = False,
    upper_out: bool = False,
) -> Tensor:  # fmt: skip
    """``(a I + s Z) M`` for a symmetric ``M`` that commutes with ``Z`` (both polynomials in one symmetric matrix),
    so that the product is symmetric: where the Triton polynomial made ``Z`` the whole factor, one triangle of it
    on the symmetric-product kernel (exactly symmetric), else matmuls. Measured on an H100 (GPT-2-small step,
    bf16, ``benchmarks/step.py``): the first step's error against float64 NS fell from 1.52e-2 (cuBLAS for
    these products) to 1.04e-2, the plain-NS level (1.00e-2), at about the same speed. ``divisor``: the result
    divided by it, per matrix (in the kernel's epilogue where it runs). ``upper``: Z and M are stored in upper
    tiles only (``_upper_chain``), and with ``upper_out`` so may the result be."""
    Z, a, s = poly
    if a == 0 and s == 1 and kernels.use_kernel(Z):
        return kernels.sym_product(Z, W=M, divisor=divisor, upper_in=upper, upper_out=upper_out)
    return _divided(_times(M, poly), divisor)


def _divided(X: Tensor, divisor: Tensor | None) -> Tensor:
    """``X / divisor`` per matrix, in place (computed in float32 or X's wider dtype, rounded once to X's dtype)."""
    return X if divisor is None else X.div_(divisor.view(-1, 1, 1))


def _first_step_unnormalised(X: Tensor, coefs: Sequence[float], divisor: Tensor) -> Tensor:
    """One NS step on ``X / divisor`` (per matrix) for an unnormalised ``X``, without dividing ``X``: the Gram
    matrix comes out of the product divided by ``divisor^2``, and where the Triton kernel makes the whole
    polynomial ``P``, it comes out divided by ``divisor``, so ``(P / d) X`` is the step's result. Saves the
    pass that divides the input (H100, GPT-2-small step back to back: 3.14 -> 3.00 ms plain, 2.86 -> 2.72 Gram,
    ``benchmarks/dev/results/step_fold_normalisation_ab_h100.json``)."""
    up = _upper_chain(X, [coefs])
    A = kernels.sym_product(X, divisor=divisor, power=2, upper_out=up)
    P = _kernel_polynomial(A, coefs, divisor, upper_in=up)
    if P is not None:
        del A  # spent: not held through the product
        return P @ X
    return _divided(_times(X, _polynomial(A, coefs)), divisor)


def newton_schulz_plain(X: Tensor, rows: Sequence[Sequence[float]]) -> Tensor:
    """The NS iteration as written, in plain torch, for a batch ``X`` (b, m, n), m <= n, already normalised:
    per row of coefficients ``(a, b, c, ...)``, ``A = X X^T`` and ``X = a X + (b A + c A^2 + ...) X``. What runs
    on CPU and wherever the Triton kernel does not (``_newton_schulz`` adds the kernel's fast path)."""
    for a, *higher in rows:
        A = X @ X.mT
        if len(higher) == 1:  # cubic: X = a X + b A X
            X = torch.baddbmm(X, A, X, beta=a, alpha=higher[0])
        else:
            B = _poly_in_gram(A, higher)  # B = b A + c A^2 + ...
            X = torch.baddbmm(X, B, X, beta=a)  # X = a X + B X
    return X


def _newton_schulz(X: Tensor, rows: Sequence[Sequence[float]], divisor: Tensor | None = None) -> Tensor:
    """Apply one odd polynomial per row to the singular values of each matrix of ``X`` (b, m, n), m <= n.

    Per step, with ``A = X X^T``: ``X = (a I + b A + c A^2 + ...) X``, i.e. ``p(s) = a s + b s^3 + c s^5 + ...``
    on every singular value ``s``. ``divisor``: ``X`` is unnormalised and the input is ``X / divisor``.
    """
    if divisor is not None:
        if not rows:
            return _divided(X, divisor)
        X, rows = _first_step_unnormalised(X, rows[0], divisor), rows[1:]
    up = _upper_chain(X, rows)
    for coefs in rows:  # X X^T (the Triton kernel where it applies), a temporary: freed once the polynomial is made
        X = _times(X, _polynomial(kernels.sym_product(X, upper_out=up), coefs, upper_in=up))
    return X


def _gram_newton_schulz(
    X: Tensor, rows: Sequence[Sequence[float]], restarts: Sequence[int], divisor: Tensor | None = None
) -> Tensor:
    """The same polynomials as ``_newton_schulz``, iterated on the small Gram matrix (Dao-AILab's Gram NS).

    Every step multiplies X on the left by ``P = a I + b R + c R^2 + ...`` with ``R = X X^T``; since P is a
    polynomial in R the two commute, so ``R_next = P R P = P (P R)`` and the product ``Q = P_k ... P_1`` can be
    accumulated on ``m x m`` matrices. X (``m x n``) is touched only to form R, at each restart
    (``X = Q X``, ``R = X X^T``, which bounds half-precision drift in R) and at the end. Per step this
    costs about ``8 m^3`` FLOPs instead of ``4 m^2 n + 2 m^3``: a saving once ``n`` is about ``2 m`` or more.

    ``divisor``: ``X`` is unnormalised and the input is ``X / divisor`` (per matrix): R comes out of its product
    divided by ``divisor^2``, and the Q that next multiplies this X (before the first restart or at the end)
    divided by ``divisor``, so X itself is never divided.

    Where ``_upper_chain`` allows, the ``m x m`` matrices are stored in upper tiles only, except each Q that
    multiplies X (by cuBLAS).
    """
    up = _upper_chain(X, rows)
    R = kernels.sym_product(X, divisor=divisor, power=2, upper_out=up)
    Q: Tensor | None = None
    last = len(rows) - 1
    for i, coefs in enumerate(rows):
        if i in restarts and i > 0 and Q is not None:
            X = Q @ X
            R = kernels.sym_product(X, upper_out=up)
            Q, divisor = None, None
        meets_x = i == last or i + 1 in restarts  # this Q multiplies X next
        poly = _polynomial(R, coefs, upper_in=up, upper_out=up and not (Q is None and meets_x))
        d = divisor if meets_x else None
        if Q is None:
            Z, a, s = poly
            if a == 0 and s == 1:
                Q = Z if d is None else _divided(Z.clone(), d)  # P (the Triton polynomial; Z is used below)
            else:
                Q = Z * s  # a copy: Z may be R itself (cubics) and is used again below
                Q.diagonal(dim1=-2, dim2=-1).add_(a)  # Q = P
                _divided(Q, d)
        else:
            Q = _times_symmetric(Q, poly, d, upper=up, upper_out=up and not meets_x)  # Q = P Q
        if i < last and i + 1 not in restarts:
            R = _times_symmetric(_times_symmetric(R, poly, upper=up, upper_out=up), poly, upper=up, upper_out=up)
    return _divided(X, divisor) if Q is None else Q @ X


def _iterate(
    X: Tensor, rows: Sequence[Sequence[float]], method: str, restarts: Sequence[int], divisor: Tensor | None = None
) -> Tensor:
    """The NS iterations on a normalised batch ``X`` (``m <= n``), or on ``X / divisor`` (per matrix) without
    dividing ``X``: Gram NS for rectangular matrices when asked (``restarts``: the positions, as
    ``restart_positions`` resolved and checked them). The iterations hold the only reference to ``X`` that
    this call is given (it keeps none): where the caller keeps none either, ``X`` is freed once spent, one
    batch-sized buffer less at the iterations' peak."""
    held = [X]
    del X
    if uses_gram(method, held[0].shape, held[0].device):
        return _gram_newton_schulz(held.pop(), rows, tuple(restarts), divisor)
    if divisor is None and not (kernels.use_kernel(held[0]) or kernels.use_kernel(held[0], has_y=True)):
        return newton_schulz_plain(held.pop(), rows)  # no Triton kernel here
    return _newton_schulz(held.pop(), rows, divisor)
