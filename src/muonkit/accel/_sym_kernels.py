"""The Triton source of ``kernels``: the symmetric-product kernel (``alpha X W^T + beta Y + diag I`` on the tiles on
and above the diagonal, mirrored, optionally from and to upper-tile storage, divided per matrix) and its launcher,
and the float64 Frobenius-norm launcher (its kernel, ``sq_norm_kernel``, lives with the fused passes in
``_fused_kernels``). Built on first use (``kernels._triton``); ``kernels`` holds the switches (``EVEN``), the tile
tuner and when the kernels run."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from . import _fused_kernels, kernels
from .kernels import Config

# a module global, not a local of build: torch.compile (Inductor) copies a user kernel together with the Triton
# functions it calls, and finds those among the kernel's globals only
_sym_k_range: Any = None


@functools.cache
def _gpu_name(device: torch.device) -> str:
    """Part of a tuned choice's key: the same shape may tune differently on another GPU model in one process."""
    return torch.cuda.get_device_name(device)


def build() -> tuple[Any, Any, bool]:
    """Define the kernels; returns ``(eager launcher, Frobenius-norm launcher, whether torch.compile can trace the
    kernel as the custom op torch.ops.muonkit.sym_product)``."""
    import triton
    import triton.language as tl

    global _sym_k_range

    @triton.jit
    def _sym_k_range(
        acc, xb, wb, rm, rn, M, K, sxm, sxk, swm, swk, lo, hi,
        X_T: tl.constexpr, W_T: tl.constexpr, BK: tl.constexpr, EVEN: tl.constexpr,
    ):  # fmt: skip
        # acc += X[rm, lo:hi] W[rn, lo:hi]^T; X_T / W_T: that operand is a symmetric matrix of which only the
        # tiles on and above the diagonal are stored, and this range lies below it: read X[k, rm] instead
        rk = tl.arange(0, BK)
        for k0 in range(lo, hi, BK):
            kk = k0 + rk
            if X_T:  # noqa: SIM108 - one pointer pattern per constexpr case
                a_ptr = xb + kk[None, :] * sxm + rm[:, None] * sxk
            else:
                a_ptr = xb + rm[:, None] * sxm + kk[None, :] * sxk
            if W_T:  # noqa: SIM108
                b_ptr = wb + kk[None, :] * swm + rn[:, None] * swk
            else:
                b_ptr = wb + rn[:, None] * swm + kk[None, :] * swk  # W[rn, k], transposed in SMEM
            if EVEN:  # whole tiles only (M % BM == 0, K % BK == 0): no masks
                a = tl.load(a_ptr)
                bn = tl.load(b_ptr)
            else:
                a = tl.load(a_ptr, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
                bn = tl.load(b_ptr, mask=(rn[:, None] < M) & (kk[None, :] < K), other=0.0)
            acc += tl.dot(a, tl.trans(bn))
        return acc

    @triton.jit
    def sym_product_kernel(
        X, W, Y, C, S, M, K,
        sxb, sxm, sxk, swb, swm, swk, syb, sym, syn, scb, scm, scn,
        alpha, beta, diag,
        HAS_Y: tl.constexpr, HAS_W: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, S_POW: tl.constexpr,
        EVEN: tl.constexpr, UPPER_IN: tl.constexpr, MIRROR: tl.constexpr,
    ):  # fmt: skip
        # program pid -> tile (ti, tj), ti <= tj: pid = tj (tj + 1) / 2 + ti enumerates the upper triangle
        pid = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        tj = ((tl.sqrt(8.0 * pid + 1.0) - 1.0) * 0.5).to(tl.int32)
        tj = tl.where((tj + 1) * (tj + 2) // 2 <= pid, tj + 1, tj)  # guard the float rounding
        tj = tl.where(tj * (tj + 1) // 2 > pid, tj - 1, tj)
        ti = pid - tj * (tj + 1) // 2
        rm = ti * BM + tl.arange(0, BM)
        rn = tj * BM + tl.arange(0, BM)
        xb = X + b * sxb
        wb = W + b * swb
        acc = tl.zeros((BM, BM), dtype=tl.float32)
        if UPPER_IN:
            # X and W (K = M) symmetric, stored on and above the diagonal in BM x BM tiles (lower tiles unwritten):
            # X[rm, k] is stored for k >= ti BM, W[rn, k] for k >= tj BM (ti <= tj); below that, read transposed
            acc = _sym_k_range(acc, xb, wb, rm, rn, M, K, sxm, sxk, swm, swk, 0, ti * BM, True, True, BK, EVEN)
            acc = _sym_k_range(acc, xb, wb, rm, rn, M, K, sxm, sxk, swm, swk, ti * BM, tj * BM, False, True, BK, EVEN)
            acc = _sym_k_range(acc, xb, wb, rm, rn, M, K, sxm, sxk, swm, swk, tj * BM, K, False, False, BK, EVEN)
        else:
            acc = _sym_k_range(acc, xb, wb, rm, rn, M, K, sxm, sxk, swm, swk, 0, K, False, False, BK, EVEN)
        if HAS_W:  # noqa: SIM102 - a constexpr test apart: no code at all without W
            if ti == tj:  # X W^T is symmetric in exact arithmetic only: make the diagonal tile so in floating point
                acc = 0.5 * (acc + tl.trans(acc))
        acc = acc * alpha
        mask = (rm[:, None] < M) & (rn[None, :] < M)
        if HAS_Y:
            y = tl.load(Y + b * syb + rm[:, None] * sym + rn[None, :] * syn, mask=mask, other=0.0)
            acc += beta * y.to(tl.float32)
        acc += tl.where(rm[:, None] == rn[None, :], diag, 0.0)
        if S_POW != 0:  # divided by this matrix's S[b] (S_POW = 1) or its square (2), in float32
            inv = 1.0 / tl.load(S + b)
            if S_POW == 2:
                inv = inv * inv
            acc = acc * inv
        out = acc.to(C.dtype.element_ty)
        cb = C + b * scb
        tl.store(cb + rm[:, None] * scm + rn[None, :] * scn, out, mask=mask)
        if MIRROR and ti != tj:  # the mirror tile, stored row by row (coalesced)
            mirror = (rn[:, None] < M) & (rm[None, :] < M)
            tl.store(cb + rn[:, None] * scm + rm[None, :] * scn, tl.trans(out), mask=mirror)

    def norms(G: Tensor) -> Tensor:
        return _fused_kernels.sq_norm_partials(G).sum(dim=1).sqrt_().view(G.shape[0], 1, 1)

    @functools.cache
    def _fixed(cfg: Config) -> Any:
        """The kernel with one fixed configuration, for torch.compile: Inductor takes a user kernel's warps and
        stages from its ``triton.Config`` (the form ``triton.autotune`` hands them over in); with a single
        config there is nothing for it to benchmark. Measured on an H100 (GPT-2-small step, compiled with
        reduce-overhead): 0.026 ms per polynomial call, against 0.032 ms in an eager step's CUDA graphs."""
        bm, bk, warps, stages = cfg
        config = triton.Config({"BM": bm, "BK": bk}, num_warps=warps, num_stages=stages)
        return triton.autotune(configs=[config], key=[])(sym_product_kernel)

    def launch(
        wrap: Any, X: Tensor, alpha: float, beta: float, Y: Tensor | None, diag: float, W: Tensor | None = None,
        S: Tensor | None = None, power: int = 1, upper_in: bool = False, mirror: bool = True,
    ) -> Tensor:  # fmt: skip
        """``wrap``: ``None`` for an eager launch, ``torch.library.wrap_triton`` when traced by torch.compile;
        ``S``: per-matrix float32 divisors (eager only), applied ``power`` times; ``upper_in``: X and W are
        stored in upper tiles only (see :func:`sym_product`); ``mirror=False``: write the upper tiles only."""
        if X.stride(-1) != 1:  # rows must be contiguous along k for coalesced loads
            X = X.contiguous()
        w = X if W is None else (W if W.stride(-1) == 1 else W.contiguous())
        bsz, m, k = X.shape
        C = torch.empty((bsz, m, m), dtype=X.dtype, device=X.device)
        if bsz == 0 or m == 0:
            return C
        y = Y if Y is not None else C  # unused when HAS_Y is False

        def run(cfg: Config, ahead: bool = False) -> None:
            bm, bk, warps, stages = cfg
            tiles = triton.cdiv(m, bm)
            args = (
                X, w, y, C, C if S is None else S, m, k,
                X.stride(0), X.stride(1), X.stride(2), w.stride(0), w.stride(1), w.stride(2),
                y.stride(0), y.stride(1), y.stride(2),
                C.stride(0), C.stride(1), C.stride(2),
                float(alpha), float(beta), float(diag),
            )  # fmt: skip
            grid = (tiles * (tiles + 1) // 2, bsz)
            even = kernels.EVEN and m % bm == 0 and k % bk == 0
            flags = dict(
                HAS_Y=Y is not None, HAS_W=W is not None, S_POW=0 if S is None else power, EVEN=even,
                UPPER_IN=upper_in, MIRROR=mirror,
            )  # fmt: skip
            if wrap is not None:  # traced: tile sizes, warps and stages travel inside a one-config kernel (_fixed)
                wrap(_fixed(cfg))[grid](*args, **flags)
            elif ahead:  # compiled (on kernels._compile_ahead's threads), not launched
                sym_product_kernel.warmup(*args, grid=grid, **flags, BM=bm, BK=bk, num_warps=warps, num_stages=stages)
            else:
                sym_product_kernel[grid](*args, **flags, BM=bm, BK=bk, num_warps=warps, num_stages=stages)

        key = (bsz, m, k, Y is not None, X.dtype, upper_in, mirror, _gpu_name(X.device))
        if kernels.compiling_ahead():
            for cfg in kernels.ahead_configs(key):
                run(cfg, ahead=True)
            return C
        run(kernels._tune(run, key))
        return C

    compile_ok = False
    try:  # a custom op torch.compile can trace (and CUDA-graph), torch >= 2.6
        from torch.library import triton_op, wrap_triton

        @triton_op(
            "muonkit::sym_product",
            mutates_args=(),
            schema="(Tensor X, float alpha, float beta, Tensor? Y, float diag, Tensor? W=None) -> Tensor",
        )
        def op(X: Tensor, alpha: float, beta: float, Y: Tensor | None, diag: float, W: Tensor | None = None) -> Tensor:
            return launch(wrap_triton, X, alpha, beta, Y, diag, W)

        compile_ok = torch.cuda.is_available() and kernels._capability(torch.device("cuda")) >= 8
    except (ImportError, AttributeError, TypeError, RuntimeError):  # pragma: no cover - older torch
        pass
    return functools.partial(launch, None), norms, compile_ok
