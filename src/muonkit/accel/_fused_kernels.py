"""Triton kernels of ``muonkit.accel.fused`` (imported only where Triton is installed; see that module), and the
float64 sums of squares (``sq_norm_partials``) that its normalisation and ``kernels.frobenius_norms`` share."""

# ruff: noqa: SIM108

import struct

import torch
import triton
import triton.language as tl

TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
            torch.float64: tl.float64}  # fmt: skip


@triton.jit
def pick(s, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15):
    # the address of slot s (SLOTS = 16 integer arguments: no table to upload, capturable as is), as the unsigned
    # 64-bit integer an address is. Triton types an integer argument by its value (i32 below 2^31, else i64), and
    # its interpreter keeps one below 2^32 in 4 bytes whatever the type says; from triton 3.9 the interpreter's
    # int-to-pointer cast is a bitcast, which fails on those 4 bytes (CPU tensors below 4 GiB, as on a non-PIE
    # Python's heap). A cast that changes signedness converts for real in both the interpreter and compiled code.
    a = tl.where(s == 1, a1, a0)
    a = tl.where(s == 2, a2, a)
    a = tl.where(s == 3, a3, a)
    a = tl.where(s == 4, a4, a)
    a = tl.where(s == 5, a5, a)
    a = tl.where(s == 6, a6, a)
    a = tl.where(s == 7, a7, a)
    a = tl.where(s == 8, a8, a)
    a = tl.where(s == 9, a9, a)
    a = tl.where(s == 10, a10, a)
    a = tl.where(s == 11, a11, a)
    a = tl.where(s == 12, a12, a)
    a = tl.where(s == 13, a13, a)
    a = tl.where(s == 14, a14, a)
    a = tl.where(s == 15, a15, a)
    return a.to(tl.uint64)


@triton.jit
def grad_address(s, row0, GT, G_TABLE: tl.constexpr, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14,
                 a15):  # fmt: skip
    # the gradient of slot s: with G_TABLE from the int64 table GT in device memory (entry row0 + s), which the
    # caller fills before each launch or graph replay, so that a captured graph follows gradients that move
    if G_TABLE:
        a = tl.load(GT + row0 + s).to(tl.uint64)
    else:
        a = pick(s, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15)
    return a


@triton.jit
def lerp(a, b, w):
    # torch.lerp's two forms (ATen's lerp), in float32
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit
def tile(R, C, tiles_c, BR: tl.constexpr, BC: tl.constexpr):
    # this program's tile: its rows and columns, their mask and offsets in a row-major R x C matrix
    t = tl.program_id(0)
    rows = (t // tiles_c) * BR + tl.arange(0, BR)
    cols = (t % tiles_c) * BC + tl.arange(0, BC)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    return rows, cols, mask, rows[:, None].to(tl.int64) * C + cols[None, :]


@triton.jit
def stacked(O, i, sob, sor, soc, rows, cols):
    # the tile's entries in matrix i of the stacked NS tensor O (any strides)
    return O + i * sob + rows[:, None].to(tl.int64) * sor + cols[None, :].to(tl.int64) * soc


@triton.jit
def kept(mask, F, CHECK: tl.constexpr):
    # the store mask of a pass that changes state: with CHECK, nothing is stored when the float32 flag at F (the
    # step's found_inf: a gradient held NaN or Inf) is nonzero, so a non-finite step changes nothing
    if CHECK:
        mask = tl.where(tl.load(F) == 0.0, mask, False)  # (``mask & scalar`` fails in Triton's interpreter)
    return mask


@triton.jit
def direction(g, b, mu, NESTEROV: tl.constexpr, B_T: tl.constexpr):
    # what NS orthogonalizes, rounded to the buffer's dtype as momentum_update's result is: g.lerp(b, mu) or b
    if NESTEROV:
        u = lerp(g, b, mu).to(B_T).to(tl.float32)
    else:
        u = b
    return u


@triton.jit
def load_gb(g_ptr, b_ptr, offs, mask, B_T: tl.constexpr):
    # g in the buffer's dtype first (momentum_update casts it so), both as float32
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(B_T).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return g, b


@triton.jit
def momentum_kernel(
    g0, g1, g2, g3, g4, g5, g6, g7, g8, g9, g10, g11, g12, g13, g14, g15,
    b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15,
    P, row0, O, sob, sor, soc, R, C, tiles_c, T, w, mu, S, F, GT,
    NESTEROV: tl.constexpr, WRITE_U: tl.constexpr, FROM_S: tl.constexpr, CHECK: tl.constexpr, G_T: tl.constexpr,
    B_T: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, G_TABLE: tl.constexpr,
):  # fmt: skip
    if FROM_S:  # hyper-parameters read from device memory (a captured graph replays with new values)
        w = tl.load(S + 2)
        mu = tl.load(S + 3)
    s = tl.program_id(1)
    g_ptr = grad_address(s, row0, GT, G_TABLE, g0, g1, g2, g3, g4, g5, g6, g7, g8, g9, g10, g11, g12, g13, g14, g15).to(
        tl.pointer_type(G_T)
    )
    b_ptr = pick(s, b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15).to(tl.pointer_type(B_T))
    rows, cols, mask, offs = tile(R, C, tiles_c, BR, BC)
    g, b = load_gb(g_ptr, b_ptr, offs, mask, B_T)
    b = lerp(b, g, w).to(B_T)
    tl.store(b_ptr + offs, b, mask=kept(mask, F, CHECK))
    u = direction(g, b.to(tl.float32), mu, NESTEROV, B_T)
    i = (row0 + s).to(tl.int64)
    if WRITE_U:  # u itself, unnormalised, in the NS precision: scale_kernel divides it in place
        tl.store(stacked(O, i, sob, sor, soc, rows, cols), u.to(O.dtype.element_ty), mask=mask)
    u64 = u.to(tl.float64)
    tl.store(P + i * T + tl.program_id(0), tl.sum(tl.sum(u64 * u64, axis=1), axis=0))


def float64_bits(x: float) -> int:
    """``x``'s float64 bit pattern as an integer: Triton passes a Python float as float32, which would round
    ``norm_scale`` and ``eps`` before the float64 arithmetic of ``norms_kernel`` (with ``norm_scale=1.1``, one of
    two test matrices got a float32 denominator one unit in the last place off the torch path's, on an H200)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@triton.jit(do_not_specialize=["T", "SCALE_BITS", "EPS_BITS"])  # one compiled variant whatever the values
def norms_kernel(P, D, T, SCALE_BITS, EPS_BITS, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # per matrix i: norm_scale sqrt(sum of its T partial sums) + eps, in float64 (norm_scale and eps travel as
    # their float64 bits, ``float64_bits``), rounded once to float32
    i = tl.program_id(0).to(tl.int64)
    norm_scale = SCALE_BITS.to(tl.int64).to(tl.float64, bitcast=True)
    eps = EPS_BITS.to(tl.int64).to(tl.float64, bitcast=True)
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for it in range(ITERS):
        offs = it * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(P + i * T + offs, mask=offs < T, other=0.0)
    d = tl.sqrt(tl.sum(acc, axis=0)) * norm_scale + eps
    d = tl.where(d > 0, d, 1.0)  # eps = 0 and u = 0: stay 0
    tl.store(D + i, d.to(tl.float32))


@triton.jit
def normalise_kernel(
    g0, g1, g2, g3, g4, g5, g6, g7, g8, g9, g10, g11, g12, g13, g14, g15,
    b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15,
    D, row0, O, sob, sor, soc, R, C, tiles_c, mu, S, GT,
    NESTEROV: tl.constexpr, FROM_S: tl.constexpr, G_T: tl.constexpr, B_T: tl.constexpr, BR: tl.constexpr,
    BC: tl.constexpr, G_TABLE: tl.constexpr,
):  # fmt: skip
    if FROM_S:
        mu = tl.load(S + 3)
    s = tl.program_id(1)
    g_ptr = grad_address(s, row0, GT, G_TABLE, g0, g1, g2, g3, g4, g5, g6, g7, g8, g9, g10, g11, g12, g13, g14, g15).to(
        tl.pointer_type(G_T)
    )
    b_ptr = pick(s, b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15).to(tl.pointer_type(B_T))
    rows, cols, mask, offs = tile(R, C, tiles_c, BR, BC)
    g, b = load_gb(g_ptr, b_ptr, offs, mask, B_T)
    i = (row0 + s).to(tl.int64)
    x = direction(g, b, mu, NESTEROV, B_T) / tl.load(D + i)
    tl.store(stacked(O, i, sob, sor, soc, rows, cols), x.to(O.dtype.element_ty), mask=mask)


@triton.jit
def update_kernel(
    p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15,
    row0, O, sob, sor, soc, R, C, tiles_c, scale, decay, S, F,
    P_T: tl.constexpr, U_T: tl.constexpr, DECAY: tl.constexpr, FROM_S: tl.constexpr, CHECK: tl.constexpr,
    BR: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    if FROM_S:
        scale = tl.load(S)
        decay = tl.load(S + 1)
    s = tl.program_id(1)
    p_ptr = pick(s, p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15).to(tl.pointer_type(P_T))
    rows, cols, mask, offs = tile(R, C, tiles_c, BR, BC)
    o = tl.load(stacked(O, (row0 + s).to(tl.int64), sob, sor, soc, rows, cols), mask=mask)
    # torch: mul(o, scale, out=U) rounds to o's dtype (the op's) before U's; then U.to(p.dtype)
    upd = (o.to(tl.float32) * scale).to(O.dtype.element_ty).to(U_T).to(P_T).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask)
    if DECAY:
        p = (p.to(tl.float32) * decay).to(P_T)
    tl.store(p_ptr + offs, (p.to(tl.float32) - upd).to(P_T), mask=kept(mask, F, CHECK))


@triton.jit
def scale_kernel(X, D, N, BLOCK: tl.constexpr):
    # X[i] / D[i] in place, for dense matrices of N entries each
    i = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ptr = X + i * N + offs
    x = tl.load(ptr, mask=offs < N).to(tl.float32) / tl.load(D + i)
    tl.store(ptr, x.to(X.dtype.element_ty), mask=offs < N)


@triton.jit
def sq_norm_kernel(X, P, N, sxb, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # partial sums of squares, accumulated in float64, of BLOCK * ITERS consecutive entries of matrix b
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    start = pid.to(tl.int64) * BLOCK * ITERS
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for i in range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + b * sxb + offs, mask=offs < N, other=0.0).to(tl.float64)
        acc += x * x
    tl.store(P + b * tl.num_programs(0) + pid, tl.sum(acc, axis=0))


def sq_norm_partials(G: torch.Tensor) -> torch.Tensor:
    """Float64 partial sums of squares of each matrix of ``G`` (``(b, m, n)``, dense or the transpose of a dense
    batch: its entries are read in memory order), ``(b, parts)``."""
    bsz, m, n = G.shape
    block, iters = 1024, 8
    parts = max(1, triton.cdiv(m * n, block * iters))
    partial = torch.empty((bsz, parts), dtype=torch.float64, device=G.device)
    if bsz:
        sq_norm_kernel[(parts, bsz)](G, partial, m * n, G.stride(0), BLOCK=block, ITERS=iters, num_warps=4)
    return partial


@triton.jit
def divide_kernel(G, sgb, sgr, sgc, D, X, R, C, tiles_c, BR: tl.constexpr, BC: tl.constexpr):
    # X[b] = G[b] / D[b] into the dense (b, R, C) X from G with any strides (a transposed view reads column-wise
    # and is written row-wise): float32, correctly rounded as torch divides, then rounded once to X's dtype
    b = tl.program_id(1).to(tl.int64)
    rows, cols, mask, offs = tile(R, C, tiles_c, BR, BC)
    g = tl.load(stacked(G, b, sgb, sgr, sgc, rows, cols), mask=mask, other=0.0).to(tl.float32)
    x = tl.div_rn(g, tl.load(D + b))
    tl.store(X + b * R * C + offs, x.to(X.dtype.element_ty), mask=mask)


@triton.jit
def finite_kernel(TABLE, OWNER, START, NUMEL, OK, F, X_T: tl.constexpr, CMP_T: tl.constexpr, CHUNK: tl.constexpr,
                  BLOCK: tl.constexpr):  # fmt: skip
    # chunk c of the tensors named by TABLE (int64 addresses): CHUNK entries of tensor OWNER[c] from entry START[c]
    # on; OK[c] <- 1 if all are finite, else 0 and the float32 flag F <- 1 (F is zeroed before the launch). CMP_T:
    # float32 for 16-bit and float32 tensors (exact: every finite value stays finite), float64 for float64 ones
    c = tl.program_id(0)
    t = tl.load(OWNER + c)
    start = tl.load(START + c)
    numel = tl.load(NUMEL + t)
    x_ptr = tl.load(TABLE + t).to(tl.uint64).to(tl.pointer_type(X_T))
    bad = tl.zeros((BLOCK,), dtype=tl.int32)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < numel, other=0.0).to(CMP_T)
        bad = tl.maximum(bad, tl.where(tl.abs(x) < float("inf"), 0, 1))  # NaN compares false too
    found = tl.max(bad, axis=0)
    tl.store(OK + c, (1 - found).to(tl.int8))
    one = tl.arange(0, 1)
    tl.store(F + one, tl.full((1,), 1.0, tl.float32), mask=(one + found) > 0)  # a vector mask (see ``kept``)
