"""Fused element-wise stages of a Muon step on CUDA: momentum in, normalised NS input out; update applied in one pass.

The torch form of a Muon step moves each hidden matrix through device memory many times around the
Newton-Schulz products: the momentum lerp (read g and buf, write buf), the Nesterov blend (read both again,
write u), stacking u into a batch, the Frobenius norm, the division into the NS precision, scaling the NS
output into an update, weight decay on the parameter and the subtraction. Here the same arithmetic is
three Triton kernels per batch of same-shape matrices (plus a tiny one that turns partial sums into norms):

1. ``momentum``: ``buf <- buf + (1 - mu) (g - buf)``, ``u = g + mu (buf - g)`` (Nesterov) or ``buf``, and the
   float64 sum of ``u^2`` per tile (partial sums; no atomics, so the result is deterministic); for a bf16 NS
   precision it also writes ``u`` itself, in bf16, into the batch the NS products read (transposed there
   when the matrix has more rows than columns);
2. ``norms``: per matrix, the partial sums into ``norm_scale ||u||_F + eps`` (float32, as the torch path rounds it);
3. bf16: with ``denom`` given (the fused step inside a captured batch, or with graphs off) nothing more: the
   denominators go to the NS products, which divide in their epilogues (``orthogonalize_filled(...,
   unnormalised=True)``); otherwise ``scale`` divides that batch by them in place. Other precisions
   (float16's range could not hold an unnormalised gradient): ``normalise`` forms ``u`` again from ``g`` and
   the new ``buf`` (recomputing costs less than writing and reading it back) and writes ``u / denominator``
   once;
4. ``update``: ``p <- p (1 - lr wd) - scale O`` from the NS output ``O``, with the torch path's roundings.

Given a ``found_inf`` flag on the device (the step's gradients held NaN or Inf), passes 1 and 4 store nothing: the
step changes no buffer and no parameter, decided on the GPU without a host sync (``muonkit.optim.nonfinite``).

Bytes through memory for float32 gradients, state and parameters (4 bytes each) per entry: bf16 NS input
14 + 10 = 24 with ``denom`` (14 + 4 + 10 = 28 with the in-place division; float16: 12 + 10 + 10 = 32), against
about 68 for the torch path. The kernels read each
matrix through its own address (no stacked copy of the gradients): up to ``SLOTS`` addresses travel in one
launch as plain integer arguments, so a launch is a fixed sequence of arguments that CUDA graphs capture and
``torch.compile`` calls as an opaque custom op (``torch.ops.muonkit.momentum_normalise`` /
``muonkit.scaled_update``, torch >= 2.4); no address table has to be uploaded. The exception is the gradients of a
step replayed from a CUDA graph: a loop that frees its gradients every step gets them at new addresses, so there the
momentum pass reads them from a small table in device memory that the step rewrites (``grad_table``).

The arithmetic follows ``torch.lerp`` (small weight: ``a + w (b - a)``, else ``b - (b - a)(1 - w)``) and the
torch path's casts, so results agree with it to rounding (the norm's float64 partial sums are grouped
differently; with the in-place division a bf16 NS input is rounded twice, ``u`` then ``u / denominator``,
where the torch path rounds once: at most one bf16 unit in the last place apart). Used by
:func:`muonkit.optim.functional.muon_step` (through ``muonkit.optim.plans``) where :func:`applies` holds;
everything else takes the torch path.
``muonkit.accel.disabled()`` / ``Muon(accel=False)`` turn it off (:func:`set_fused` alone, for benchmarks).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import kernels

__all__ = [
    "SLOTS",
    "AddressTable",
    "Matrices",
    "applies",
    "frobenius_normalise",
    "fused_enabled",
    "momentum_normalise",
    "prepare",
    "scaled_update",
    "set_fused",
]

SLOTS = 16  # matrix addresses per launch (kernel arguments)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_enabled = True
_compile_ok = False  # the custom ops are registered (torch.compile calls them)


def set_fused(enabled: bool) -> None:
    """Turn the fused element-wise kernels of the Muon step on or off (the torch path is used when off)."""
    global _enabled
    _enabled = bool(enabled)


def fused_enabled() -> bool:
    return _enabled


def prepare() -> bool:
    """Import Triton and register the custom ops now (so that a ``torch.compile``'d first step can use them);
    whether the fused kernels are available on this machine."""
    return _enabled and kernels.get_mode() != "torch" and torch.cuda.is_available() and _build() is not None


class Matrices:
    """Same-shape ``(rows, cols)`` row-major matrices that live inside larger tensors: matrix ``i`` starts
    ``offsets[i]`` elements into ``tensors[owners[i]]``. The kernels take these as addresses; the custom ops
    take the owning tensors, so torch.compile sees which tensors they read and write."""

    def __init__(self, tensors: Sequence[Tensor], owners: Sequence[int], offsets: Sequence[int], rows: int, cols: int):
        self.tensors = list(tensors)
        self.owners = list(owners)
        self.offsets = list(offsets)
        self.rows, self.cols = rows, cols

    def __len__(self) -> int:
        return len(self.owners)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[self.owners[0]].dtype  # every matrix of one batch has one dtype

    def addresses(self) -> list[int]:
        base: dict[int, int] = {}  # one data_ptr() per owning tensor (a fused QKV tensor holds three matrices)
        for o in self.owners:
            if o not in base:
                base[o] = self.tensors[o].data_ptr()
        size = self.tensors[self.owners[0]].element_size() if self.owners else 0
        return [base[o] + k * size for o, k in zip(self.owners, self.offsets)]

    def views(self) -> list[Tensor]:
        """The matrices as tensor views (the torch reference and tests)."""
        n = self.rows * self.cols
        t = self.tensors
        return [t[o].reshape(-1)[k : k + n].view(self.rows, self.cols) for o, k in zip(self.owners, self.offsets)]


class AddressTable:
    """Tensors' addresses in device memory (int64), for kernels that read their operands through it (the momentum
    pass's ``grad_table``, ``accel.finite.FiniteScan``): a captured graph of such kernels replays on tensors that a
    loop allocated anew. :meth:`update` rewrites it only where the addresses changed; the copy from pageable host
    memory is staged by the driver: no host sync, ordered before the kernels on the stream."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.table = torch.zeros(size, dtype=torch.int64, device=device)
        self._held: list[int] | None = None

    def update(self, addresses: list[int]) -> Tensor:
        if addresses != self._held:
            self.table.copy_(torch.tensor(addresses, dtype=torch.int64), non_blocking=True)
            self._held = addresses
        return self.table


def applies(tensors: Sequence[Tensor], ns_dtype: torch.dtype) -> bool:
    """Whether the fused kernels can take a step over ``tensors`` (parameters, gradients, momentum buffers):
    enabled, all on one CUDA device (compute capability >= 8) with Triton, dense and contiguous, float32 /
    bfloat16 / float16, none needing autograd, and a NS precision of at most float32."""
    if not (_enabled and tensors and kernels.get_mode() != "torch") or ns_dtype not in DTYPES:
        return False
    device = tensors[0].device
    if device.type != "cuda":
        return False
    index, grad = tensors[0].get_device(), torch.is_grad_enabled()
    for t in tensors:  # cheap checks first: this runs every step, over every tensor
        if not (t.is_cuda and t.get_device() == index and t.dtype in DTYPES and t.is_contiguous()):
            return False
        if t.layout != torch.strided or (grad and t.requires_grad):
            return False
    if torch.compiler.is_compiling():
        return _compile_ok
    return _build() is not None and kernels._capability(device) >= 8


def momentum_normalise(
    grads: Matrices, bufs: Matrices, out: Tensor, *, momentum: float, nesterov: bool, norm_scale: float, eps: float,
    scalars: Tensor | None = None, denom: Tensor | None = None, found_inf: Tensor | None = None,
    grad_table: Tensor | None = None,
) -> None:  # fmt: skip
    """Advance the momentum buffers in place and write ``u_i / (norm_scale ||u_i||_F + eps)`` into ``out[i]``
    (``(b, rows, cols)``, any strides: a transposed view writes the NS orientation directly).

    ``scalars``: a float32 CUDA tensor ``[scale, decay, 1 - momentum, momentum]`` to read the momentum from
    instead (eager only: what a captured CUDA graph replays with new values; see :func:`scaled_update`).

    ``denom`` (eager only, ``out`` in bfloat16 or float32): write ``u_i`` itself into ``out[i]`` and its divisor
    ``norm_scale ||u_i||_F + eps`` into ``denom[i]`` (float32, ``(b,)``) instead: for
    ``orthogonalize_filled(..., unnormalised=True)``, which divides inside the NS products.

    ``found_inf`` (eager only): a float32 one-element CUDA tensor; where it holds a nonzero value when the kernel
    runs, the buffers are left as they were (``out`` is still written). What lets a step check its gradients for
    NaN/Inf on the device, without a host sync: see ``muonkit.optim.nonfinite``.

    ``grad_table`` (eager only): an int64 CUDA tensor of ``len(grads)`` entries holding ``grads.addresses()``,
    written by the caller; the kernels read the gradients' addresses from it instead of taking them as
    arguments. A captured graph then reads whatever gradients the table names when it replays: a training loop
    that frees its gradients every step (``zero_grad(set_to_none=True)``) gets new addresses each time."""
    if len(grads) == 0:
        return
    if grad_table is not None and (grad_table.dtype != torch.int64 or grad_table.shape != (len(grads),)):
        raise ValueError(f"grad_table needs int64, shape ({len(grads)},); got {grad_table.dtype}, {grad_table.shape}")
    if denom is not None and (out.dtype not in (torch.bfloat16, torch.float32) or denom.shape != (len(grads),)):
        raise ValueError(f"denom needs a bf16/float32 output and shape ({len(grads)},), got {out.dtype}, {denom.shape}")
    if torch.compiler.is_compiling():
        torch.ops.muonkit.momentum_normalise(
            grads.tensors, grads.owners, grads.offsets, bufs.tensors, bufs.owners, bufs.offsets,
            out, momentum, nesterov, norm_scale, eps,
        )  # fmt: skip
        return
    _build().momentum_normalise(
        grads, bufs, out, momentum, nesterov, norm_scale, eps, scalars, denom, found_inf, grad_table
    )


def scaled_update(
    params: Matrices, O: Tensor, *, scale: float, decay: float, update_dtype: torch.dtype,
    scalars: Tensor | None = None, found_inf: Tensor | None = None,
) -> None:  # fmt: skip
    """``p_i <- p_i * decay - scale * O[i]`` with the torch path's roundings (the scaled update is rounded to
    ``update_dtype``, then to the parameter's dtype). ``O`` is ``(b, rows, cols)`` with any strides.

    ``scalars`` (eager only): read ``scale`` and ``decay`` from this float32 tensor ``[scale, decay, ...]``
    instead; ``decay`` must still say whether there is weight decay (``decay != 1``). ``found_inf`` (eager only): as
    in :func:`momentum_normalise`, the parameters are left as they were where it holds a nonzero value."""
    if len(params) == 0:
        return
    if torch.compiler.is_compiling():
        torch.ops.muonkit.scaled_update(
            params.tensors, params.owners, params.offsets, O, scale, decay, _DTYPE_CODES[update_dtype]
        )
        return
    _build().scaled_update(params, O, scale, decay, update_dtype, scalars, found_inf)


def frobenius_normalise(G: Tensor, norm_scale: float, eps: float, dtype: torch.dtype) -> Tensor | None:
    """``G / (norm_scale ||G||_F + eps)`` per matrix of ``G`` (``(b, m, n)``), written into a new dense ``dtype``
    tensor, as ``newton_schulz.iteration._frobenius_normalise`` computes it (float64 sums of squares; a zero
    denominator becomes 1; float32 denominators and division, one rounding into ``dtype``) in three kernels where
    torch launches about ten (most of them on ``b`` numbers: a single matrix's normalisation is launch-bound).
    ``None`` where the kernels cannot take it (off, not CUDA with compute capability >= 8 and Triton, inside
    ``torch.compile``, needing autograd; ``G`` must be dense or the transpose of a dense batch, float32 / bfloat16 /
    float16, and ``dtype`` one of those): the caller computes it with torch."""
    if G.ndim != 3 or torch.compiler.is_compiling():
        return None
    if not applies([G if G.is_contiguous() else G.mT], dtype):  # what the fused step asks of its tensors
        return None
    out = torch.empty(G.shape, dtype=dtype, device=G.device)
    _build().normalise(G, float(norm_scale), float(eps), out)
    return out


_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}


@functools.cache
def _build() -> Any:
    """Compile-on-first-use launchers (``None`` without Triton)."""
    try:
        import triton
    except ImportError:
        return None

    from . import _fused_kernels as K

    tl_dtype = K.TL_DTYPE

    def grid(rows: int, cols: int, transposed: bool, wide: bool = False) -> tuple[int, int, int, int]:
        """``(BR, BC, tiles per row of tiles, tiles per matrix)``: row-major tiles of 4096 entries; square ones where
        the stacked side is transposed (its writes/reads go column-wise), except ``wide`` ones for the momentum pass
        (16 x 256 there: 2.33 -> 2.83 TB/s for 3072 x 768 matrices on an H100, 64 x 64 still best for the update
        pass; ``benchmarks/dev/results/elementwise_configs_h100.json``)."""
        if transposed and not wide:
            br, bc = 64, 64
        else:
            bc = 256 if transposed else 128
            bc = bc if cols >= bc else max(16, triton.next_power_of_2(cols))
            br = max(16, 4096 // bc) if transposed else 32
        tiles_c = triton.cdiv(cols, bc)
        return br, bc, tiles_c, triton.cdiv(rows, br) * tiles_c

    def slots(*addresses: list[int]) -> list[tuple[int, int, list[int]]]:
        """Per launch: ``(first matrix, matrices, SLOTS addresses of each operand, padded, concatenated)``."""
        b = len(addresses[0])
        launches = []
        for row0 in range(0, b, SLOTS):
            args: list[int] = []
            for a in addresses:
                group = a[row0 : row0 + SLOTS]
                args += group + [group[0]] * (SLOTS - len(group))
            launches.append((row0, min(SLOTS, b - row0), args))
        return launches

    def momentum_normalise(
        grads: Matrices, bufs: Matrices, out: Tensor, momentum: float, nesterov: bool, norm_scale: float, eps: float,
        scalars: Tensor | None = None, divisors: Tensor | None = None, found_inf: Tensor | None = None,
        grad_table: Tensor | None = None,
    ) -> None:  # fmt: skip
        R, C = grads.rows, grads.cols
        b = len(grads)
        br, bc, tiles_c, T = grid(R, C, out.stride(-1) != 1, wide=True)
        partial = torch.empty((b, T), dtype=torch.float64, device=out.device)
        denom = torch.empty((b,), dtype=torch.float32, device=out.device) if divisors is None else divisors
        types = dict(NESTEROV=nesterov, G_T=tl_dtype[grads.dtype], B_T=tl_dtype[bufs.dtype], BR=br, BC=bc,
                     FROM_S=scalars is not None, G_TABLE=grad_table is not None)  # fmt: skip
        s = denom if scalars is None else scalars  # any tensor when unused
        f = denom if found_inf is None else found_inf
        gt = denom if grad_table is None else grad_table
        b_addresses = bufs.addresses()
        # with a table the gradient arguments are unused: the buffers' addresses stand in (valid integers)
        launches = slots(b_addresses if grad_table is not None else grads.addresses(), b_addresses)
        dense = out if out.is_contiguous() else out.mT  # the (b, R, C) or (b, C, R) block the NS products read
        in_place = (out.dtype == torch.bfloat16 and dense.is_contiguous()) or divisors is not None
        strides = (out.stride(0), out.stride(1), out.stride(2))
        for row0, n, args in launches:
            K.momentum_kernel[(T, n)](
                *args, partial, row0, out, *strides, R, C, tiles_c, T, 1.0 - momentum, momentum, s, f, gt,
                WRITE_U=in_place, CHECK=found_inf is not None, **types,
            )  # fmt: skip
        K.norms_kernel[(b,)](partial, denom, T, K.float64_bits(norm_scale), K.float64_bits(eps), BLOCK=256,
                             ITERS=triton.cdiv(T, 256), num_warps=2)  # fmt: skip
        if divisors is not None:  # the NS products divide
            return
        if in_place:  # bf16 (float32's range): u was written unnormalised; divide it where it lies
            block = 2048
            K.scale_kernel[(triton.cdiv(R * C, block), b)](dense, denom, R * C, BLOCK=block, num_warps=4)
            return
        for row0, n, args in launches:
            K.normalise_kernel[(T, n)](*args, denom, row0, out, *strides, R, C, tiles_c, momentum, s, gt, **types)

    def scaled_update(
        params: Matrices, O: Tensor, scale: float, decay: float, update_dtype: torch.dtype,
        scalars: Tensor | None = None, found_inf: Tensor | None = None,
    ) -> None:  # fmt: skip
        R, C = params.rows, params.cols
        br, bc, tiles_c, T = grid(R, C, O.stride(-1) != 1)
        types = dict(P_T=tl_dtype[params.dtype], U_T=tl_dtype[update_dtype], DECAY=decay != 1.0, BR=br, BC=bc,
                     FROM_S=scalars is not None, CHECK=found_inf is not None)  # fmt: skip
        s = O if scalars is None else scalars
        f = O if found_inf is None else found_inf
        for row0, n, args in slots(params.addresses()):
            K.update_kernel[(T, n)](
                *args, row0, O, O.stride(0), O.stride(1), O.stride(2), R, C, tiles_c, scale, decay, s, f, **types
            )

    def finite(table: Tensor, owner: Tensor, start: Tensor, numel: Tensor, ok: Tensor, flag: Tensor,
               dtype: torch.dtype, chunk: int, block: int) -> None:  # fmt: skip
        """``accel.finite.FiniteScan``'s kernel over the chunks of one dtype's tensors (``finite_kernel``)."""
        cmp = tl_dtype[torch.float64 if dtype == torch.float64 else torch.float32]
        K.finite_kernel[(owner.numel(),)](
            table, owner, start, numel, ok, flag, X_T=tl_dtype[dtype], CMP_T=cmp, CHUNK=chunk, BLOCK=block
        )

    def normalise(G: Tensor, norm_scale: float, eps: float, out: Tensor) -> None:
        """``out[i] = G[i] / (norm_scale ||G[i]||_F + eps)`` (``frobenius_normalise``): float64 partial sums of
        squares, one small kernel for the denominators, one pass that divides into ``out``."""
        b, R, C = G.shape
        if b == 0:
            return
        denom = torch.empty((b,), dtype=torch.float32, device=G.device)
        partial = K.sq_norm_partials(G)
        parts = partial.shape[1]
        K.norms_kernel[(b,)](partial, denom, parts, K.float64_bits(norm_scale), K.float64_bits(eps), BLOCK=256,
                             ITERS=triton.cdiv(parts, 256), num_warps=2)  # fmt: skip
        br, bc, tiles_c, T = grid(R, C, G.stride(-1) != 1)
        K.divide_kernel[(T, b)](G, G.stride(0), G.stride(1), G.stride(2), denom, out, R, C, tiles_c, BR=br, BC=bc)

    _register()
    return _Launchers(momentum_normalise, scaled_update, finite, normalise)


class _Launchers(NamedTuple):
    momentum_normalise: Any
    scaled_update: Any
    finite: Any
    normalise: Any


def _register() -> None:
    """Register the launchers as torch custom ops (opaque to torch.compile, which calls them as they are)."""
    global _compile_ok
    try:
        from torch.library import custom_op
    except ImportError:  # pragma: no cover - torch < 2.4
        return
    if hasattr(torch.ops.muonkit, "momentum_normalise"):  # registered before (``_build.cache_clear()``)
        _compile_ok = True
        return

    @custom_op("muonkit::momentum_normalise", mutates_args=("bufs", "out"))
    def momentum_normalise_op(
        grads: list[Tensor], g_owners: list[int], g_offsets: list[int],
        bufs: list[Tensor], b_owners: list[int], b_offsets: list[int],
        out: Tensor, momentum: float, nesterov: bool, norm_scale: float, eps: float,
    ) -> None:  # fmt: skip
        R, C = out.shape[-2:]
        g, b = Matrices(grads, g_owners, g_offsets, R, C), Matrices(bufs, b_owners, b_offsets, R, C)
        _build().momentum_normalise(g, b, out, momentum, nesterov, norm_scale, eps)

    @momentum_normalise_op.register_fake
    def _(grads, g_owners, g_offsets, bufs, b_owners, b_offsets, out, momentum, nesterov, norm_scale, eps):
        return None

    @custom_op("muonkit::scaled_update", mutates_args=("params",))
    def scaled_update_op(
        params: list[Tensor], owners: list[int], offsets: list[int], O: Tensor, scale: float, decay: float, code: int
    ) -> None:
        R, C = O.shape[-2:]
        _build().scaled_update(Matrices(params, owners, offsets, R, C), O, scale, decay, _CODE_DTYPES[code])

    @scaled_update_op.register_fake
    def _(params, owners, offsets, O, scale, decay, code):
        return None

    _compile_ok = True
