"""Symmetric products for Newton-Schulz: ``alpha X X^T + beta Y + diag I``, one triangle computed and mirrored.

Also ``X W^T`` where the caller knows the product is symmetric (Gram NS multiplies polynomials of one
symmetric matrix, which commute).

Both symmetric products of an NS step have this form: ``A = X X^T`` and the step's polynomial
``a I + b A + c A A`` (``A`` is symmetric, so ``A A = A A^T``). A Triton kernel computes only the tiles on
and above the diagonal (``T (T + 1) / 2`` of ``T^2`` tiles) and writes each off-diagonal tile twice, once
transposed, with a float32 epilogue (one rounding for the whole polynomial). It runs when :func:`set_mode`
allows it and the inputs suit it (CUDA, Triton importable, bf16/fp16, compute capability >= 8); everything
else takes torch matmuls, so the CPU and any unsupported case always work. It is registered as a torch
custom op (``torch.ops.muonkit.sym_product``, torch >= 2.6), so ``torch.compile`` traces it and CUDA graphs
capture it; on older torch the torch path is taken inside ``torch.compile``.

Modes: ``"auto"`` (default) uses the kernel inside ``torch.compile`` or CUDA-graph capture for the step
polynomial of matrices of at least ``AUTO_MIN_ROWS`` rows and for ``X X^T`` alone from ``AUTO_XXT_MIN_ROWS``
rows (both 512: measured inside CUDA graphs on an H100, ``benchmarks/dev/sym_persistent.py``), where the call
has enough tiles to keep the GPU busy (``AUTO_MIN_FILL``; not checked inside ``torch.compile``),
and in eager mode only for calls of at least ``AUTO_EAGER_MIN_WORK`` multiply-adds (``b m^2 k``), where its
launch cost is hidden (measured on an H100, ``benchmarks/dev/kernels.py``); ``"triton"`` uses it wherever it can
run and raises where it cannot (tests, benchmarks); ``"torch"`` never uses it. ``muonkit.accel.disabled()`` (or
``Muon(accel=False)``) turns the kernels off. Tile sizes: each new (batch, shape) is timed once over ``CONFIGS``
in eager mode and the fastest kept (``Muon`` does this for its own batches when it is built), in memory and in a
file that later processes read (``tile_cache``); inside ``torch.compile`` or graph capture an untimed shape takes a
size-based default.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from . import tile_cache

__all__ = [
    "AUTO_EAGER_MIN_WORK",
    "AUTO_MIN_FILL",
    "AUTO_MIN_ROWS",
    "AUTO_XXT_MIN_ROWS",
    "CONFIGS",
    "MODES",
    "UPPER_TILE",
    "capture_warmup",
    "frobenius_norms",
    "get_mode",
    "prepare",
    "pretune",
    "set_mode",
    "sym_product",
    "triton_applies",
    "upper_chain",
    "upper_tiles",
    "use_kernel",
]

MODES = ("torch", "auto", "triton")
AUTO_MIN_ROWS = 512  # auto mode: the step polynomial in compiled or CUDA-graph-captured calls from this many rows
# auto mode: X X^T alone from this many rows. Timed inside CUDA graphs (as the eager step and torch.compile run
# it), the kernel's half product beat cuBLAS's full one from 768 rows on an H100 (48 x 768^2: 0.065 vs 0.074 ms,
# benchmarks/dev/results/sym_persistent_h100.json; GPT-2-small step 4.1 vs 4.5 ms); timed launch by launch
# (kernel_configs.py) cuBLAS had looked faster below 2048 rows.
AUTO_XXT_MIN_ROWS = 512
AUTO_EAGER_MIN_WORK = 2**35  # auto mode, eager: b m^2 k at least this (a launch must outweigh its CPU cost)
# auto mode: a call's programs (``upper_tiles``) at least this many times the GPU's SM count. Below, cuBLAS's
# smaller tiles on the whole product keep more SMs busy: orthogonalize on a single 768-row matrix (21 programs on an
# H200's 132 SMs) took 1.12-1.21x torch's GPU time with the kernel, on two such matrices 0.85-0.87x. Over 512-2048
# rows and 1-8 matrices: 1.05-1.23x up to 0.16 of the SM count, 0.93-1.05x at 0.23-0.27, 0.58-0.94x from 0.30 up
# (benchmarks/dev/sym_occupancy.py, benchmarks/dev/results/sym_occupancy_h200.json)
AUTO_MIN_FILL = 0.25
HALF = (torch.bfloat16, torch.float16)

_mode = "auto"
# Filled by _triton(): plain globals, so that torch.compile reads them without tracing cached calls.
_compile_ok = False  # the kernel is a torch custom op (torch.ops.muonkit.sym_product) torch.compile can trace
_launch: Any = None  # eager launcher (no dispatcher: a custom op's eager call costs tens of microseconds)
_norms: Any = None  # the Frobenius-norm kernel's launcher
_capture_warmup = False  # inside ``capture_warmup()``: eager calls decide as captured ones will


def set_mode(mode: str) -> None:
    """Choose where symmetric products run: ``"torch"``, ``"auto"`` or ``"triton"`` (see the module docstring)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"kernel mode must be one of {MODES}, got {mode!r}")
    _mode = mode


def get_mode() -> str:
    return _mode


@functools.cache
def _triton() -> Any:
    """Build the Triton kernels (``_sym_kernels``) on first use; ``None`` without Triton."""
    global _launch, _norms, _compile_ok
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    from . import _sym_kernels

    _launch, _norms, _compile_ok = _sym_kernels.build()
    return _launch


def prepare() -> bool:
    """Import Triton and register the kernel's custom op, if they are available; whether the kernel can run."""
    return _mode != "torch" and torch.cuda.is_available() and _triton() is not None


def pretune(batches: Any, dtype: torch.dtype, device: torch.device) -> int:
    """Time the tile sizes now, eagerly, for NS batches ``(b, m, n)`` that compiled or graph-captured code will
    later run (where no timing is possible and an untimed shape takes a default). Returns how many batches
    the kernel takes. Uses a temporary ``b x m x n`` tensor per batch."""
    if not prepare() or dtype not in HALF:
        return 0
    _Disk.batching = True
    try:
        return _pretune(batches, dtype, device)
    finally:
        _Disk.batching = False
        save_tiles()


def _pretune(batches: Any, dtype: torch.dtype, device: torch.device) -> int:
    _compile_ahead(batches, dtype, device)
    return _pretune_pass(batches, dtype, device)


def _compile_ahead(batches: Any, dtype: torch.dtype, device: torch.device) -> None:
    """Compile every kernel variant and candidate configuration that ``_pretune_pass`` will time, on a thread
    pool at once (Triton's ``AsyncCompileMode``, where the installed Triton has it; else they compile one by
    one as the timing reaches them). The pass runs with no kernel launched: each call only asks Triton to
    compile its candidates (``ahead``), so its results are unwritten tensors that only the next call's shapes
    read. A fresh machine (empty Triton cache) compiled 32 variants one by one in 28 s for a 12 x 768 GPT (H200)."""
    try:
        import triton
    except ImportError:  # pragma: no cover - pretune needs Triton
        return
    mode = getattr(triton, "AsyncCompileMode", None)
    if mode is None or _Ahead.active:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1)) as pool:
        _Ahead.active = True
        try:  # it only saves time: whatever fails here, the timing pass compiles again and reports
            with contextlib.suppress(Exception), mode(pool):
                _pretune_pass(batches, dtype, device, real=False)
        finally:
            _Ahead.active = False


class _Ahead:
    """Whether ``_compile_ahead`` is running: the launcher then compiles its candidates instead of launching."""

    active = False


def compiling_ahead() -> bool:
    return _Ahead.active


def ahead_configs(key: tuple) -> list[Config]:
    """What ``_compile_ahead`` compiles for a call with ``key``: its known choice (this process's or the disk
    cache's), else every candidate ``_tune`` will time."""
    _load_tiles()
    return [_best[key]] if key in _best else candidates(key)


def _pretune_pass(batches: Any, dtype: torch.dtype, device: torch.device, real: bool = True) -> int:
    taken = 0
    for b, m, n in batches:
        X = torch.empty((b, m, n), device=device, dtype=dtype)
        if real:
            X.normal_().div_(n**0.5)
        with capture_warmup():
            if not use_kernel(X) and not use_kernel(X, has_y=True):
                continue
            A = sym_product(X)
            sym_product(A, alpha=1.0, beta=1.0, Y=A, diag=1.0)
            if m != n:  # Gram NS: m x m products of polynomials in A (the updates of Q and R)
                sym_product(A, W=A)
            if upper_chain(A):  # the same products on upper-tile storage, written so or whole
                sym_product(X, upper_out=True)
                for whole in (False, True):
                    sym_product(A, alpha=1.0, beta=1.0, Y=A, diag=1.0, upper_in=True, upper_out=not whole)
                    if m != n:
                        sym_product(A, W=A, upper_in=True, upper_out=not whole)
        taken += 1
    return taken


def triton_applies(X: Tensor) -> bool:
    """Whether the Triton kernel can take ``X`` (``(b, m, k)``): CUDA, bf16/fp16, compute capability >= 8, Triton."""
    return X.is_cuda and X.ndim == 3 and X.dtype in HALF and _capability(X.device) >= 8 and _triton() is not None


@contextlib.contextmanager
def capture_warmup() -> Iterator[None]:
    """Eager calls inside this block choose the kernel as calls under CUDA-graph capture would, so the warm-up
    before a capture times the kernel's tile sizes for the shapes the graph will then use (no timing is
    possible during capture itself)."""
    global _capture_warmup
    before, _capture_warmup = _capture_warmup, True
    try:
        yield
    finally:
        _capture_warmup = before


@functools.cache
def _capability(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


@functools.cache
def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def upper_tiles(b: int, m: int) -> int:
    """The kernel's programs for ``b`` products of ``m x m`` (its ``UPPER_TILE`` tiles on and above the diagonal)."""
    t = -(-m // UPPER_TILE)
    return b * t * (t + 1) // 2


def use_kernel(X: Tensor, has_y: bool = False) -> bool:
    """Whether :func:`sym_product` takes the Triton path for ``X`` under the current mode (``has_y``: the step
    polynomial, else ``X X^T`` alone).

    In mode ``"triton"`` a tensor the kernel cannot take raises instead of silently falling back.
    """
    if _mode == "torch" or (X.requires_grad and torch.is_grad_enabled()):  # the kernel has no backward
        return False
    compiling = torch.compiler.is_compiling()  # then no cached calls, globals only
    ok = (_compile_ok and X.is_cuda and X.ndim == 3 and X.dtype in HALF) if compiling else triton_applies(X)
    if _mode == "auto":
        if not ok or X.shape[-2] < (AUTO_MIN_ROWS if has_y else AUTO_XXT_MIN_ROWS):
            return False
        if not compiling and upper_tiles(X.shape[0], X.shape[-2]) < AUTO_MIN_FILL * _sms(X.device):
            return False  # too few programs to fill the GPU: cuBLAS's smaller tiles finish first
        if compiling or _capture_warmup or torch.cuda.is_current_stream_capturing():
            return True
        return X.shape[0] * X.shape[-2] ** 2 * X.shape[-1] >= AUTO_EAGER_MIN_WORK
    if ok:
        return True
    if X.numel():
        raise RuntimeError(
            f"kernel mode 'triton' but the kernel cannot take a {tuple(X.shape)} {X.dtype} tensor on {X.device} "
            f"(needs CUDA with compute capability >= 8, Triton, bf16/fp16)"
        )
    return False


def sym_product(
    X: Tensor, alpha: float = 1.0, beta: float = 0.0, Y: Tensor | None = None, diag: float = 0.0,
    W: Tensor | None = None, divisor: Tensor | None = None, power: int = 1, upper_in: bool = False,
    upper_out: bool = False,
) -> Tensor:  # fmt: skip
    """``(alpha X W^T + beta Y + diag I) / divisor**power`` for a batch ``X`` of shape ``(b, m, k)``, ``W = X``
    unless given; ``Y`` (``(b, m, m)``) must be symmetric, and so must ``X W^T`` (e.g. ``W`` symmetric and
    commuting with ``X``: two polynomials in one symmetric matrix, as in Gram Newton-Schulz). ``divisor``:
    ``None`` or one float32 number per matrix (``(b,)``), applied in the float32 epilogue with ``power`` 1 or 2
    (NS on an unnormalised input: ``X X^T / d^2`` is the normalised input's Gram matrix).

    The result is symmetric; on the Triton path it is exactly so (each off-diagonal tile is one value,
    written twice), on the torch path up to rounding.

    Upper-tile storage, for chains of products of symmetric matrices (Gram NS): with ``upper_out`` the Triton
    path writes only the ``UPPER_TILE``-sized tiles on and above the diagonal (the others keep whatever the
    fresh tensor held), saving the mirror writes; with ``upper_in``, ``X``, ``W`` and ``Y`` (square,
    symmetric) are read from those tiles only, half the bytes. A result stored so is only fit for another
    ``upper_in`` call (see :func:`upper_chain`); the torch path makes its inputs whole first and returns
    whole results.
    """
    if divisor is not None and (power not in (1, 2) or divisor.shape != (X.shape[0],)):
        raise ValueError(f"divisor must have shape ({X.shape[0]},) and power be 1 or 2, got {divisor.shape}, {power}")
    if upper_in and X.shape[-1] != X.shape[-2]:
        raise ValueError(f"upper_in needs square symmetric matrices, got {tuple(X.shape)}")
    same = (Y is None or Y.dtype == X.dtype) and (W is None or (W.dtype == X.dtype and W.shape == X.shape))
    if use_kernel(X, Y is not None) and same:
        if not torch.compiler.is_compiling():
            return _launch(X, alpha, beta, Y, diag, W, divisor, power, upper_in, not upper_out)
        if divisor is None and not upper_in:
            return torch.ops.muonkit.sym_product(X, alpha, beta, Y, diag, W)
    if upper_in:
        X = _whole(X)
        W = None if W is None else _whole(W)
        Y = None if Y is None else _whole(Y)
    right = (X if W is None else W).mT
    if Y is None:
        out = X @ right
        if alpha != 1.0:
            out.mul_(alpha)
    else:
        out = torch.baddbmm(Y, X, right, beta=beta, alpha=alpha)
    if diag:
        out.diagonal(dim1=-2, dim2=-1).add_(diag)
    if divisor is not None:
        work = torch.promote_types(out.dtype, torch.float32)  # float32 for half inputs, as the kernel
        d = divisor.view(-1, 1, 1).to(work)
        out = (out.to(work) / (d * d if power == 2 else d)).to(out.dtype)
    return out


def _whole(T: Tensor) -> Tensor:
    """A symmetric matrix stored in upper tiles only, made whole (its upper triangle mirrored)."""
    upper = torch.triu(T)
    return upper + torch.triu(upper, diagonal=1).mT


def upper_chain(X: Tensor) -> bool:
    """Whether every ``(b, m, m)`` product of a chain on matrices shaped like ``X`` takes the Triton kernel
    (step polynomials and ``X W^T`` alike), eagerly: then the chain may keep its intermediates in upper tiles
    only (``sym_product(upper_in=..., upper_out=...)``)."""
    if not UPPER or torch.compiler.is_compiling() or X.shape[-1] != X.shape[-2]:
        return False
    return use_kernel(X, has_y=True) and use_kernel(X)


NORM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def frobenius_norms(G: Tensor) -> Tensor:
    """``||G_i||_F`` of every matrix of ``G`` (``(b, m, n)``), in float64, shape ``(b, 1, 1)``.

    Squares are summed in float64, so no entry between about 1e-150 and 1e150 overflows or underflows. On CUDA,
    eagerly (graph capture included), a Triton kernel reads each entry once and sums in float64 (partial
    sums per block, then one deterministic reduction); torch's float64 norm would first copy the whole
    input to float64 (20 of its 24 bytes per float32 entry). Elsewhere, and inside ``torch.compile`` (which
    fuses the conversion), torch computes it.
    """
    dense = G.ndim == 3 and (G.is_contiguous() or G.mT.is_contiguous())
    if (
        _mode != "torch"
        and dense
        and G.is_cuda
        and G.dtype in NORM_DTYPES
        and not (G.requires_grad and torch.is_grad_enabled())
        and not torch.compiler.is_compiling()
        and _triton() is not None
    ):
        return _norms(G)
    return torch.linalg.vector_norm(G, dim=(-2, -1), keepdim=True, dtype=torch.float64)


Config = tuple[int, int, int, int]  # (BM, BK, num_warps, num_stages)
# The tile configurations the tuner tries. A sweep of 40 configurations on an H100 (benchmarks/dev/kernel_configs.py:
# GPT-2-small and 1B NS batches, 768-2048 rows) found the fastest of all among these four for every batch,
# X X^T and step polynomial alike. Wide 128 x 256 tiles (the shape cuBLAS uses on Hopper) were 1.1-3.6x slower
# in every case (kernel_configs_wide_tiles_h100.json, commit 0674526).
CONFIGS: tuple[Config, ...] = ((128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 8, 5), (128, 64, 4, 3))
# tuned choice per (batch, M, K, has Y, dtype, upper_in, mirror, GPU name): a property of the GPU and the shape, not
# of an optimizer, so optimizers share it; at most _MAX_BEST entries (a few bytes each), the oldest dropped first
_best: dict[tuple, Config] = {}
_MAX_BEST = 4096
# Upper-tile storage (NS's m x m products, ``sym_product(upper_in=..., upper_out=...)``): a matrix stored only
# in the BM x BM tiles on and above the diagonal is read right only by a kernel with the same tile size, so
# every such call takes tiles of this size (each entry of CONFIGS has them).
UPPER_TILE = 128
EVEN = True  # unmasked loads where the tiles divide the matrix (benchmarks turn it off to compare)
UPPER = True  # upper-tile storage for chains of symmetric products (upper_chain; benchmarks turn it off)


def _default_config(m: int, k: int, has_y: bool) -> Config:
    """Without a timed choice (inside torch.compile or graph capture): the configuration with the smallest
    worst-case loss in that sweep (at most 7% for the polynomial, 8% for X X^T, against the best per shape)."""
    return (128, 64, 4, 3) if has_y else (128, 64, 8, 3)


def _tune(run: Any, key: tuple) -> Config:
    """Time every configuration once per shape (eager, outside CUDA-graph capture) and keep the fastest. One
    the GPU lacks the shared memory for (4-5 stages of 128 x 64 tiles need up to 160 KB; Hopper has 227 KB
    per block, Ampere's A100 163 KB, consumer GPUs about 100 KB) is skipped. ``key``: (batch, M, K, has Y,
    dtype, upper_in, mirror, GPU name); calls that read or write upper tiles only take ``UPPER_TILE`` tiles."""
    if key in _best:
        return _best[key]
    if not _Disk.loaded:
        _load_tiles()
        if key in _best:
            return _best[key]
    configs = candidates(key)
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        default = _default_config(key[1], key[2], key[3])
        return default if default in configs else configs[0]
    from triton.runtime.errors import OutOfResources

    times = []
    for cfg in configs:
        try:
            run(cfg)  # compile and warm up
        except OutOfResources:
            times.append(float("inf"))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            run(cfg)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    if min(times) == float("inf"):
        raise RuntimeError(f"no tile configuration of the symmetric-product kernel fits this GPU: {configs}")
    best = configs[min(range(len(configs)), key=times.__getitem__)]
    while len(_best) >= _MAX_BEST:
        del _best[next(iter(_best))]
    _best[key] = best
    _Disk.unsaved = True
    if not _Disk.batching:  # pretune writes once, at its end
        save_tiles()
    return best


def candidates(key: tuple) -> list[Config]:
    """The configurations ``_tune`` times for ``key``: calls that read or write upper tiles only take
    ``UPPER_TILE`` tiles."""
    upper = key[5] or not key[6]
    configs = [c for c in CONFIGS if c[0] == UPPER_TILE and c[0] % c[1] == 0] if upper else list(CONFIGS)
    if not configs:
        raise RuntimeError(f"no configuration in CONFIGS has {UPPER_TILE} x {UPPER_TILE} tiles: {CONFIGS}")
    return configs


class _Disk:
    """The tile choices' disk cache (``tile_cache``) in this process."""

    loaded = False  # read once, at the first choice
    unsaved = False  # a choice timed since the last write
    batching = False  # inside ``pretune``, which writes at its end


def _load_tiles() -> None:
    """Once per process: the choices earlier processes timed (``tile_cache``)."""
    if not _Disk.loaded:
        _Disk.loaded = True
        for k, c in tile_cache.load(CONFIGS).items():
            _best.setdefault(k, c)


def save_tiles() -> None:
    """Write the timed choices to the disk cache (``tile_cache``) where one was made since the last write."""
    if _Disk.unsaved:
        tile_cache.save(CONFIGS, _best)
        _Disk.unsaved = False
