"""The fused element-wise kernels of the Muon step (muonkit.fused) against the torch path.

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors, so
their indexing, masking, slot selection and arithmetic are checked here too; on CUDA they run compiled.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

pytest.importorskip("triton")

from muonkit.accel import fused
from muonkit.newton_schulz.iteration import _frobenius_normalise
from muonkit.optim import functional, pipeline, plans, remembered, stages, tuning

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


@pytest.fixture(scope="module")
def launchers():
    """The kernels: compiled on CUDA, interpreted on CPU (conftest sets TRITON_INTERPRET before Triton loads)."""
    if CUDA:
        yield fused._build()
        return
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and Triton's interpreter is off")
    with pytest.MonkeyPatch.context() as mp:
        _round_bf16_to_nearest(mp)
        yield fused._build()


def _round_bf16_to_nearest(mp):
    """Triton 3.6's interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest even, as torch does):
    make the interpreter round like the hardware, so that results can be compared with torch's exactly."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    cast_impl = interp.InterpreterBuilder.cast_impl

    def rounded(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            x = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interp.TensorHandle(x.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return cast_impl(self, src, dst_type)

    mp.setattr(interp.InterpreterBuilder, "cast_impl", rounded)


def _force_fused(monkeypatch, use: bool) -> None:
    """Steps take the fused path (``use``; on the CPU its kernels run in the interpreter) or the torch path, with no
    plan remembered from before (a remembered plan is run without asking ``_fused_step_applies`` again)."""
    monkeypatch.setattr(functional, "_fused_step_applies", lambda *a: use)
    monkeypatch.setattr(plans, "_PLANS", type(plans._PLANS)())
    monkeypatch.setattr(remembered, "_REMEMBERED", [])


def _mats(tensors, rows, cols, parts):
    """Matrices of shape (rows, cols) taken as ``parts = [(tensor index, first row), ...]`` of 2-D tensors."""
    return fused.Matrices(tensors, [o for o, _ in parts], [r0 * cols for _, r0 in parts], rows, cols)


def _reference_pre(g_views, b_views, momentum, nesterov, norm_scale, eps, ns_dtype):
    b_new = [b.clone() for b in b_views]
    u = stages.momentum_update(g_views, b_new, momentum, nesterov)
    X = _frobenius_normalise(torch.stack(u), norm_scale, eps, ns_dtype)
    return b_new, X


@pytest.mark.parametrize(
    "g_dtype,b_dtype,ns_dtype,nesterov,transposed,shape",
    [
        (torch.float32, torch.float32, torch.float32, True, False, (40, 24)),
        (torch.float32, torch.float32, torch.bfloat16, True, True, (40, 24)),
        (torch.float32, torch.float32, torch.float16, False, False, (40, 24)),
        (torch.bfloat16, torch.float32, torch.bfloat16, True, False, (40, 24)),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16, True, True, (40, 24)),
        # wide rows: 32 x 128 tiles as they are, 16 x 256 written transposed
        (torch.float32, torch.float32, torch.bfloat16, True, True, (20, 300)),
        (torch.float32, torch.float32, torch.bfloat16, True, False, (20, 300)),
    ],
)
def test_momentum_normalise_matches_torch(launchers, g_dtype, b_dtype, ns_dtype, nesterov, transposed, shape):
    torch.manual_seed(0)
    rows, cols = shape  # several tiles per matrix, ragged edges
    # 18 matrices (two slot groups): 3 parts of one fused tensor, 15 separate tensors
    shapes = [(3 * rows, cols)] + [(rows, cols)] * 15
    grads = [torch.randn(s, device=DEVICE).to(g_dtype) for s in shapes]
    bufs = [torch.randn(s, device=DEVICE).to(b_dtype) for s in shapes]
    parts = [(0, 0), (0, rows), (0, 2 * rows)] + [(i, 0) for i in range(1, 16)]
    g, b = _mats(grads, rows, cols, parts), _mats(bufs, rows, cols, parts)
    ref_bufs, ref_X = _reference_pre(g.views(), b.views(), 0.9, nesterov, 1.01, 1e-7, ns_dtype)
    out = torch.full((len(parts), cols, rows) if transposed else (len(parts), rows, cols), float("nan"), device=DEVICE)
    out = out.to(ns_dtype)
    fused.momentum_normalise(
        g, b, out.mT if transposed else out, momentum=0.9, nesterov=nesterov, norm_scale=1.01, eps=1e-7
    )
    got = out.mT if transposed else out
    assert not got.isnan().any()  # every entry written
    for nb, rb in zip(b.views(), ref_bufs):
        torch.testing.assert_close(nb, rb, rtol=1e-6 if b_dtype == torch.float32 else 1e-2, atol=1e-6)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[ns_dtype]
    torch.testing.assert_close(got.float(), ref_X.float(), rtol=tol, atol=tol * 0.1)
    norms = got.float().flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, 1 / 1.01), rtol=1e-2, atol=0)


@pytest.mark.parametrize("ns_dtype,denom", [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, False)])
def test_gradient_addresses_from_a_device_table_give_the_same_step(launchers, ns_dtype, denom):
    """``grad_table``: the kernels read each gradient's address from device memory (what lets a captured graph
    follow gradients that a loop reallocates) and compute exactly what they compute with the addresses as
    arguments, over two launches of slots, parts of a fused tensor, both NS-input passes (bf16 in place, float16
    recomputed) and the divisors form; the table is checked."""
    torch.manual_seed(5)
    rows, cols = 24, 40
    shapes = [(3 * rows, cols)] + [(rows, cols)] * 15
    parts = [(0, 0), (0, rows), (0, 2 * rows)] + [(i, 0) for i in range(1, 16)]
    grads = [torch.randn(s, device=DEVICE) for s in shapes]
    start = [torch.randn(s, device=DEVICE) for s in shapes]
    results = []
    for table in (False, True):
        bufs = [b.clone() for b in start]
        g, b = _mats(grads, rows, cols, parts), _mats(bufs, rows, cols, parts)
        out = torch.full((len(parts), rows, cols), float("nan"), device=DEVICE).to(ns_dtype)
        d = torch.empty(len(parts), device=DEVICE) if denom else None
        t = torch.tensor(g.addresses(), dtype=torch.int64, device=DEVICE) if table else None
        fused.momentum_normalise(
            g, b, out, momentum=0.9, nesterov=True, norm_scale=1.01, eps=1e-7, denom=d, grad_table=t
        )  # fmt: skip
        results.append((bufs, out, d))
    (bufs0, out0, d0), (bufs1, out1, d1) = results
    assert not out1.isnan().any()
    assert torch.equal(out0, out1) and all(torch.equal(x, y) for x, y in zip(bufs0, bufs1))
    if denom:
        assert torch.equal(d0, d1)
    g = _mats(grads, rows, cols, parts)
    with pytest.raises(ValueError, match="grad_table"):
        fused.momentum_normalise(
            g, _mats(start, rows, cols, parts), out0, momentum=0.9, nesterov=True, norm_scale=1.0, eps=1e-7,
            grad_table=torch.zeros(3, dtype=torch.int64, device=DEVICE),
        )  # fmt: skip


@pytest.mark.parametrize(
    "g_dtype,ns_dtype,transposed,shape",
    [
        (torch.float32, torch.bfloat16, False, (3, 40, 24)),
        (torch.float32, torch.bfloat16, True, (3, 40, 24)),  # a tall batch, read through its transpose
        (torch.float32, torch.float32, True, (2, 72, 20)),
        (torch.bfloat16, torch.bfloat16, False, (1, 33, 70)),
        (torch.float16, torch.float16, True, (2, 17, 9)),
        (torch.float32, torch.float16, False, (2, 96, 130)),  # several partial sums per matrix
    ],
)
def test_normalise_matches_torch(launchers, g_dtype, ns_dtype, transposed, shape):
    """``fused.frobenius_normalise``'s kernels (squares, denominators, one dividing pass) write what the torch
    path of ``_frobenius_normalise`` writes, bit for bit, strided input included; a zero matrix stays zero."""
    gen = torch.Generator().manual_seed(3)
    G = (torch.randn(*shape, generator=gen) * 3).to(g_dtype).to(DEVICE)
    if transposed:
        G = G.mT.contiguous().mT  # (b, m, n) whose transpose is dense
    G[0, :, :] = 0  # with eps = 0 below: a zero denominator becomes 1, the matrix stays 0
    for norm_scale, eps in ((1.0, 1e-7), (1.1, 0.0)):
        want = _frobenius_normalise(G.cpu(), norm_scale, eps, ns_dtype)  # torch's path (on the CPU)
        got = torch.empty(G.shape, dtype=ns_dtype, device=DEVICE)
        launchers.normalise(G, norm_scale, eps, got)
        assert got.is_contiguous()
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)
        assert not got[0].any()
    if CUDA:  # the public entry point on the GPU, the one NS calls
        want = _frobenius_normalise(G.cpu(), 1.1, 1e-7, ns_dtype)
        assert torch.equal(fused.frobenius_normalise(G, 1.1, 1e-7, ns_dtype).cpu(), want)


def test_zero_gradient_with_zero_eps_stays_zero(launchers):
    grads = [torch.zeros(8, 16, device=DEVICE)]
    bufs = [torch.zeros(8, 16, device=DEVICE)]
    out = torch.full((1, 8, 16), float("nan"), device=DEVICE)
    fused.momentum_normalise(
        _mats(grads, 8, 16, [(0, 0)]), _mats(bufs, 8, 16, [(0, 0)]), out,
        momentum=0.95, nesterov=True, norm_scale=1.0, eps=0.0,
    )  # fmt: skip
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("denom", [False, True], ids=["normalised", "divisors"])
def test_found_inf_flag_masks_every_state_change(launchers, denom):
    """With a nonzero ``found_inf`` flag neither pass changes a buffer or a parameter (a NaN gradient among them);
    with a zero flag both give what they give without one, to the bit."""
    torch.manual_seed(4)
    rows, cols = 24, 40
    grads = [torch.randn(rows, cols, device=DEVICE) for _ in range(3)]
    grads[1][3, 5] = float("nan")
    parts = [(i, 0) for i in range(3)]
    results = {}
    for flag in (None, 0.0, 1.0):
        bufs = [torch.randn(rows, cols, device=DEVICE, generator=None) * 0 + i for i in range(3)]
        params = [torch.full((rows, cols), 1.0 + i, device=DEVICE) for i in range(3)]
        found_inf = None if flag is None else torch.tensor([flag], device=DEVICE)
        out = torch.empty(3, rows, cols, device=DEVICE)
        d = torch.empty(3, device=DEVICE) if denom else None
        g, b, p = (_mats(ts, rows, cols, parts) for ts in (grads, bufs, params))
        fused.momentum_normalise(g, b, out, momentum=0.9, nesterov=True, norm_scale=1.0, eps=1e-7, denom=d,
                                 found_inf=found_inf)  # fmt: skip
        fused.scaled_update(p, out.nan_to_num(), scale=0.5, decay=0.99, update_dtype=torch.float32,
                            found_inf=found_inf)  # fmt: skip
        results[flag] = (bufs, params)
    for t, ref in zip(results[1.0][0] + results[1.0][1], [torch.full((rows, cols), float(i)) for i in range(3)]
                      + [torch.full((rows, cols), 1.0 + i) for i in range(3)]):  # fmt: skip
        assert torch.equal(t.cpu(), ref)  # untouched
    for a, b in zip(results[0.0][0] + results[0.0][1], results[None][0] + results[None][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert results[0.0][0][1].isnan().any() and not results[0.0][0][0].isnan().any()  # the flag decided, not the data


@functools.cache
def _low_memory(addr: int, length: int) -> torch.Tensor | None:
    """``length`` bytes mapped at ``addr`` as a uint8 tensor, or None where that address cannot be had
    (``MAP_FIXED_NOREPLACE``: Linux >= 4.17, and nothing there yet). Kept mapped for the life of the process: a
    failing test's traceback may still hold tensors on it."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x100000  # MAP_FIXED_NOREPLACE
    got = libc.mmap(addr, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    if got != addr:
        if got not in (None, ctypes.c_void_p(-1).value):  # an old kernel took the address as a hint only
            libc.munmap(got, length)
        return None
    return torch.frombuffer((ctypes.c_uint8 * length).from_address(addr), dtype=torch.uint8)


@pytest.mark.skipif(CUDA, reason="CPU tensors at chosen addresses: the interpreter's integer handling")
@pytest.mark.parametrize("addr", [0x2000_0000, 0x9000_0000], ids=["below-2^31", "below-2^32"])
def test_kernels_take_addresses_below_4gib(launchers, addr):
    """Matrix addresses travel as integer arguments, which Triton types by value (i32 below 2^31) and its
    interpreter stores in 4 bytes below 2^32; triton 3.9's interpreter then failed to cast them to pointers
    (CPU tensors sit that low on a non-PIE Python's heap). Both kernels read and write such matrices correctly."""
    rows, cols = 24, 40
    raw = _low_memory(addr, 3 * 2 * rows * cols * 4)
    if raw is None:
        pytest.skip(f"cannot map memory at {addr:#x} here")
    g, b, p = raw.view(torch.float32).view(3, 2 * rows, cols).unbind(0)
    assert g.data_ptr() == addr
    raw.view(torch.float32).copy_(torch.randn(raw.numel() // 4, generator=torch.Generator().manual_seed(3)))
    parts = [(0, 0), (0, rows)]
    gm, bm, pm = (_mats([t], rows, cols, parts) for t in (g, b, p))
    ref_bufs, ref_X = _reference_pre(gm.views(), bm.views(), 0.9, True, 1.0, 1e-7, torch.float32)
    out = torch.full((2, rows, cols), float("nan"))
    fused.momentum_normalise(gm, bm, out, momentum=0.9, nesterov=True, norm_scale=1.0, eps=1e-7)
    for nb, rb in zip(bm.views(), ref_bufs):
        torch.testing.assert_close(nb, rb, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, ref_X, rtol=1e-5, atol=1e-6)
    ref_p = [v - 0.5 * o for v, o in zip(pm.views(), out.unbind(0))]
    fused.scaled_update(pm, out, scale=0.5, decay=1.0, update_dtype=torch.float32)
    for got, want in zip(pm.views(), ref_p):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("p_dtype,decay,transposed", [(torch.float32, 1.0, False), (torch.float32, 0.99, True),
                                                      (torch.bfloat16, 0.98, False)])  # fmt: skip
def test_scaled_update_matches_torch(launchers, p_dtype, decay, transposed):
    torch.manual_seed(1)
    rows, cols = 24, 40
    params = [torch.randn(2 * rows, cols, device=DEVICE).to(p_dtype)] + [
        torch.randn(rows, cols, device=DEVICE).to(p_dtype) for _ in range(17)
    ]
    parts = [(0, 0), (0, rows)] + [(i, 0) for i in range(1, 18)]
    O = torch.randn(len(parts), cols, rows, device=DEVICE).bfloat16()
    O = O.mT if transposed else O.mT.contiguous()
    p = _mats(params, rows, cols, parts)
    ref = [v.clone() for v in p.views()]
    upd = [torch.mul(o, 0.37, out=torch.empty(o.shape, device=DEVICE)) for o in O.unbind(0)]  # as ns_jobs does
    pipeline.apply_update(ref, upd, lr=1.0, weight_decay=1 - decay)
    fused.scaled_update(p, O, scale=0.37, decay=decay, update_dtype=torch.float32)
    # bfloat16 parameters: within one rounding (torch's CPU mul_ rounds the decay scalar to bfloat16 first)
    for got, want in zip(p.views(), ref):
        atol = 1e-6 if p_dtype == torch.float32 else 8e-3 * want.abs().max().item()  # cancellation: 1 ulp of |p|
        torch.testing.assert_close(got, want, rtol=1e-6 if p_dtype == torch.float32 else 8e-3, atol=atol)


def _params(dtype=torch.float32):
    torch.manual_seed(2)
    shapes = [(48, 16), (16, 48), (48, 16), (16, 16), (8, 4, 3, 3)]
    return [torch.randn(s, device=DEVICE, dtype=dtype) for s in shapes]


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(split=3, weight_decay=0.1, nesterov=False),
        dict(matrix_view="batch", max_batch=2, method="gram", adjust_lr="match_rms_adamw"),
        dict(mixed=True, weight_decay=0.05),
    ],
)
def test_fused_muon_step_matches_torch_path(launchers, monkeypatch, options):
    """Whole steps: the fused path (forced on here, also on the CPU interpreter) against the torch path."""
    base = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, coefficients="jordan", ns_steps=5,
                adjust_lr="original", eps=1e-7, ns_dtype=torch.float32)  # fmt: skip
    base.update(options)
    if base.get("split") == 3:  # every matrix's rows must divide: QKV-like parameters only
        shapes = [(48, 16), (3 * 16, 16)]
        params = [torch.randn(s, device=DEVICE) for s in shapes]
    elif options.get("mixed"):  # parameters of two dtypes in one group: batches of each dtype
        base.pop("mixed")
        params = [torch.randn(32, 16, device=DEVICE), torch.randn(32, 16, device=DEVICE).bfloat16(),
                  torch.randn(16, 32, device=DEVICE).bfloat16()]  # fmt: skip
    else:
        params = _params()
    results = []
    for use in (False, True):
        _force_fused(monkeypatch, use)
        ps = [p.clone() for p in params]
        bufs = [torch.zeros_like(p, dtype=torch.float32) for p in ps]
        stats: dict = {}
        for step in range(3):
            grads = [torch.randn(p.shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(step + i))
                     .to(p.dtype) for i, p in enumerate(ps)]  # fmt: skip
            functional.muon_step(ps, grads, bufs, stats=stats, **base)
        results.append((ps, bufs, stats))
    (p0, b0, s0), (p1, b1, s1) = results
    for a, b in zip(p0 + b0, p1 + b1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 if a.dtype == torch.float32 else 1e-2)
    assert s0.keys() == s1.keys() == {"orth_error", "update_rms", "sigma_max", "sigma_min", "epsilon"}
    # batches may be cut differently (max_batch counts matrices here, parts there): compare per-matrix maxima
    for k in ("orth_error", "sigma_max"):
        torch.testing.assert_close(torch.stack(s0[k]).max(), torch.stack(s1[k]).max(), rtol=1e-4, atol=1e-6)


def test_gram_restarts_reach_the_fused_path(launchers, monkeypatch):
    """``restarts`` on the fused path: the plan's NS call gets the positions (resolved: ``None`` becomes the
    default placement), and the steps equal the torch path's, which orthogonalizes with them."""
    seen = []
    real = plans.orthogonalize_filled

    def recording(*args, **kw):
        seen.append((args[5], args[6]))  # method, restarts
        return real(*args, **kw)

    monkeypatch.setattr(plans, "orthogonalize_filled", recording)
    base = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, coefficients="jordan", ns_steps=5,
                adjust_lr="original", eps=1e-7, ns_dtype=torch.float32, method="gram")  # fmt: skip
    for restarts, want in ((None, (3,)), ([2, 4], (2, 4)), ([1], (1,))):
        results = []
        for use in (False, True):
            _force_fused(monkeypatch, use)
            seen.clear()
            ps = [p.clone() for p in _params()]
            bufs = [torch.zeros_like(p) for p in ps]
            for step in range(2):
                gen = torch.Generator(DEVICE).manual_seed(step)
                grads = [torch.randn(p.shape, device=DEVICE, generator=gen) for p in ps]
                functional.muon_step(ps, grads, bufs, restarts=restarts, **base)
            results.append(ps)
        assert seen and all(r == want for method, r in seen if method == "gram"), (restarts, seen)
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_batch", [None, 3, "pool"])
def test_groups_share_ns_batches_and_match_the_torch_path(launchers, monkeypatch, max_batch):
    """Muon groups with different hyper-parameters: on the fused path their same-shape matrices (either way round)
    share NS batches, a ``max_batch`` cut may fall inside a group's run, and every parameter, buffer and
    statistic equals what the torch path gives group by group. ``"pool"``: no ``max_batch``, batches cut by the
    graph-pool bound (``plans.batch_sizes``, its floor lowered to these small matrices): each within half of
    the step's matrix entries, in (nearly) equal parts."""
    import muonkit
    from muonkit import newton_schulz

    pool = max_batch == "pool"
    if pool:
        monkeypatch.setattr(plans, "POOL_MIN_ENTRIES", 0)
        max_batch = None

    torch.manual_seed(3)
    shapes = [[(48, 16)], [(16, 48), (48, 16), (16, 16)], [(48, 16), (16, 16)]]  # group 0 split in three 16 x 16
    params0 = [[torch.randn(s, device=DEVICE) for s in group] for group in shapes]
    grads = [[[torch.randn(p.shape, device=DEVICE) for p in g] for g in params0] for _ in range(3)]
    options = [dict(split=3, lr=0.03, momentum=0.9, weight_decay=0.1),
               dict(lr=0.01, nesterov=False, adjust_lr="match_rms_adamw"), dict()]  # fmt: skip
    batches = []
    real = newton_schulz.orthogonalize_filled

    def counting(fill, shape, *args, **kw):
        batches.append(shape)
        return real(fill, shape, *args, **kw)

    monkeypatch.setattr(plans, "orthogonalize_filled", counting)
    results = []
    for use in (False, True):
        _force_fused(monkeypatch, use)
        batches.clear()
        ps = [[torch.nn.Parameter(p.clone()) for p in g] for g in params0]
        groups = [dict(params=g, max_batch=max_batch, **o) for g, o in zip(ps, options)]
        opt = muonkit.Muon(groups, ns_dtype=torch.float32, diagnostics=True)
        for step_grads in grads:
            for g, gg in zip(ps, step_grads):
                for p, gp in zip(g, gg):
                    p.grad = gp.clone()
            opt.step()
        flat = [p for g in ps for p in g]
        results.append(([p.detach() for p in flat], [opt.state[p]["momentum_buffer"] for p in flat], opt.stats()))
    (p0, b0, s0), (p1, b1, s1) = results
    for a, b in zip(p0 + b0, p1 + b1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert s0.keys() == s1.keys()
    for k in s0:
        torch.testing.assert_close(s0[k], s1[k], rtol=1e-4, atol=1e-6)
    base = dict(lr=1.0, momentum=0.9, nesterov=True, weight_decay=0.0, coefficients="jordan", ns_steps=5,
                adjust_lr=None, eps=1e-7, max_batch=max_batch)  # fmt: skip
    planned = tuning.merged_ns_batches([(s, {**base, **o}) for s, o in zip(shapes, options)], torch.float32)
    # 16 x 16: 3 QKV parts + 1 + 1; 16 x 48: 2 + 1 (48 x 16 ones transposed): two batches, or cut into threes
    # with the pool bound: 3 x 768 + 5 x 256 entries, half is 1792: 16 x 48 as 2 + 1, 16 x 16 whole
    expected = {None: [(3, 16, 48), (5, 16, 16)], 3: [(2, 16, 16), (3, 16, 16), (3, 16, 48)],
                "pool": [(1, 16, 48), (2, 16, 48), (5, 16, 16)]}  # fmt: skip
    assert sorted(planned) == sorted(expected["pool" if pool else max_batch])
    assert sorted(batches) == sorted(planned * len(grads))  # what the fused steps ran


@pytest.mark.parametrize("method", ["newton_schulz", "gram"])
def test_bf16_steps_fold_the_normalisation_into_the_products(launchers, monkeypatch, method):
    """bf16 NS on the fused path: the momentum kernel writes the input undivided and the NS products divide
    (``unnormalised=True``; not with eps = 0). The updates agree with the torch path (which divides first) to
    bf16 accuracy."""
    from muonkit import newton_schulz

    seen = []
    real = newton_schulz.orthogonalize_filled

    def recording(*args, unnormalised=False, **kw):
        seen.append(unnormalised)
        return real(*args, unnormalised=unnormalised, **kw)

    monkeypatch.setattr(plans, "orthogonalize_filled", recording)
    base = dict(lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1, coefficients="jordan", ns_steps=5,
                adjust_lr="original", ns_dtype=torch.bfloat16, method=method)  # fmt: skip
    for eps in (1e-7, 0.0):
        deltas = []
        for use in (False, True):
            _force_fused(monkeypatch, use)
            ps = [p.clone() for p in _params()]
            start = [p.clone() for p in ps]
            bufs = [torch.zeros_like(p) for p in ps]
            for step in range(3):
                gen = torch.Generator(DEVICE).manual_seed(step)
                grads = [torch.randn(p.shape, device=DEVICE, generator=gen) * 10.0 ** (i - 3) for i, p in enumerate(ps)]
                functional.muon_step(ps, grads, bufs, eps=eps, **base)
            deltas.append([p - p0 for p, p0 in zip(ps, start)])
        for a, b in zip(*deltas):
            assert (a - b).norm() <= 2e-2 * b.norm()
        assert seen and all(s == (eps > 0) for s in seen)
        seen.clear()


def test_step_plans_follow_schedules_and_structure_changes(launchers, monkeypatch, tmp_path):
    """The fused step plans its batches once per structure: lr, momentum and weight decay changing every step
    (as schedules do) reuse the plan and still give the torch path's result; a change of structure (weight decay
    switched on, another ``split`` or ``ns_steps``, the coefficient file rewritten) makes a new plan."""
    import os

    import muonkit
    from muonkit.coefficients import as_preset

    torch.manual_seed(5)
    preset = tmp_path / "p.json"
    preset.write_text(as_preset("jordan").to_json())
    params0 = [[torch.randn(s, device=DEVICE) for s in g] for g in [[(48, 16)], [(16, 48), (16, 16)]]]
    grads = [[[torch.randn(p.shape, device=DEVICE) for p in g] for g in params0] for _ in range(6)]
    # per step: (lr, momentum, weight decay) of group 1, and what else changes before that step
    schedule = [(0.02, 0.9, 0.0, None), (0.015, 0.93, 0.0, None), (0.01, 0.95, 0.1, "decay on"), (0.008, 0.95, 0.2,
                None), (0.006, 0.95, 0.2, "ns_steps"), (0.004, 0.95, 0.2, "coefficients")]  # fmt: skip
    results, plan_counts = [], []
    for use in (False, True):
        _force_fused(monkeypatch, use)
        preset.write_text(as_preset("jordan").to_json())
        ps = [[torch.nn.Parameter(p.clone()) for p in g] for g in params0]
        opt = muonkit.Muon([dict(params=ps[0], split=3), dict(params=ps[1], coefficients=str(preset))],
                           ns_dtype=torch.float32)  # fmt: skip
        counts = []
        for (lr, mu, wd, change), step_grads in zip(schedule, grads):
            group = opt.param_groups[1]
            group.update(lr=lr, momentum=mu, weight_decay=wd)
            if change == "ns_steps":
                group["ns_steps"] = 4
            elif change == "coefficients":  # the file's preset changes: read again, and planned again
                preset.write_text(as_preset("polar_express").to_json())
                os.utime(preset, ns=(os.stat(preset).st_mtime_ns + 10**9,) * 2)
            for g, gg in zip(ps, step_grads):
                for p, gp in zip(g, gg):
                    p.grad = gp.clone()
            opt.step()
            counts.append(len(plans._PLANS))
        plan_counts.append(counts)
        flat = [p for g in ps for p in g]
        results.append([p.detach() for p in flat] + [opt.state[p]["momentum_buffer"] for p in flat])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert plan_counts[0] == [0] * len(schedule)  # the torch path plans nothing
    assert plan_counts[1] == [1, 1, 2, 2, 3, 4]  # new plans exactly where the structure changed


def test_remembered_plans_run_only_while_tensors_and_options_match(launchers, monkeypatch):
    """After a fused step, a step whose options and tensors match runs the remembered plan without asking
    ``_fused_step_applies`` again; a new learning rate keeps it; a gradient with other strides (same shape) or a
    structure change (``ns_steps``) sends the step through the full path again, which here sends the non-contiguous
    gradient to the torch path. Every step equals a torch-path run."""
    import muonkit

    torch.manual_seed(7)
    params0 = [torch.randn(s, device=DEVICE) for s in [(48, 16), (16, 48), (16, 16)]]
    grads = [[torch.randn(p.shape, device=DEVICE) for p in params0] for _ in range(6)]
    results, asked = [], []
    for use in (False, True):
        _force_fused(monkeypatch, use)
        calls = []

        def applies(params, grads_, bufs, ns_dtype, use=use, calls=calls):
            calls.append(1)
            return use and all(g.is_contiguous() for g in grads_)

        monkeypatch.setattr(functional, "_fused_step_applies", applies)
        ps = [torch.nn.Parameter(p.clone()) for p in params0]
        opt = muonkit.Muon(ps, ns_dtype=torch.float32)
        counts = []
        for k, step_grads in enumerate(grads):
            opt.param_groups[0]["lr"] = 0.02 / (k + 1)
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
            if k == 3:  # the same values and shape, transposed strides: not what the plan was made for
                ps[2].grad = step_grads[2].t().contiguous().t()
            if k == 5:
                opt.param_groups[0]["ns_steps"] = 4
            opt.step()
            counts.append(len(calls))
        asked.append(counts)
        results.append([p.detach().clone() for p in ps] + [opt.state[p]["momentum_buffer"] for p in ps])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert asked[0] == [1, 2, 3, 4, 5, 6]  # the torch path is never remembered
    assert asked[1] == [1, 1, 1, 2, 2, 3]  # asked at the first step, the strided gradient, the new ns_steps


def _repeat_run(monkeypatch, repeat: bool):
    """Steps of a Muon optimizer (a Muon group, an AdamW group) through the fused path, with ``Muon._step_again``
    on or off, and between steps the changes a training loop makes (or a user might). Returns the parameters and
    states after every step and, per step, whether the step took the full path (``_gather`` ran)."""
    import muonkit
    from muonkit.optim import muon as muon_module

    _force_fused(monkeypatch, True)
    if not repeat:
        monkeypatch.setattr(muon_module.Muon, "_repeatable", lambda self, *args: None)
    full = []
    gather = muon_module.Muon._gather
    monkeypatch.setattr(muon_module.Muon, "_gather", lambda self: full.append(1) or gather(self))
    torch.manual_seed(11)
    hidden = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in [(24, 16), (16, 24), (16, 16)]]
    other = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in [(16,), (10, 16)]]
    opt = muonkit.Muon([dict(params=hidden, coefficients=[[3.4445, -4.775, 2.0315]] * 5),
                        dict(params=other, algorithm="adamw")], ns_dtype=torch.float32)  # fmt: skip
    snapshot = None
    out, took_full = [], []
    for k in range(14):
        for p in hidden + other:
            p.grad = torch.randn(p.shape, device=DEVICE)  # new gradient tensors each step (zero_grad to None)
        opt.param_groups[0]["lr"] = 0.02 / (k + 1)  # a schedule: kept by the repeat
        if k == 3:  # the same values, transposed strides: the guard refuses
            hidden[2].grad = hidden[2].grad.t().contiguous().t()
        if k == 4:  # the momentum buffer replaced (not in place): the repeat reads the new one
            opt.state[hidden[0]]["momentum_buffer"] = torch.zeros_like(hidden[0])
        if k == 5:  # a coefficient row changed in place: a structure change
            opt.param_groups[0]["coefficients"][4] = [3.0, -3.2, 1.2]
        if k == 6:
            hidden[1].grad = None  # a parameter without a gradient: the full path (the step skips it)
        if k == 8:
            opt.param_groups[0]["weight_decay"] = 0.1  # weight decay switched on: structure
        if k == 9:
            snapshot = opt.state_dict()
        if k == 11:
            opt.load_state_dict(snapshot)  # new state mapping and group dicts
        if k == 12:
            opt.param_groups[1]["lr"] = 1e-3  # an AdamW number: read every step
        full_before = len(full)
        opt.step()
        took_full.append(len(full) > full_before)
        out.append(
            [t.detach().clone() for t in hidden + other]
            + [t.clone() for p in hidden + other for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
        )
    return out, took_full


def test_repeated_muon_steps_skip_the_per_parameter_work_and_match_the_full_step(launchers, monkeypatch):
    """``Muon._step_again``: after a step that ran whole through a remembered plan, the next steps run it without
    ``_gather``/``_muon_group`` while the optimizer's groups, options and state mapping stay and the plan's guard
    passes; every change that could make the plan wrong sends the step through the full path. Each step's result
    equals the full path's."""
    with_repeat, took_full = _repeat_run(monkeypatch, True)
    without, always_full = _repeat_run(monkeypatch, False)
    for a, b in zip(with_repeat, without):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert all(always_full)
    # full at the first step (nothing recorded yet), at the strided gradient and the step after it (recorded
    # with the strides of the step before), the in-place coefficient change, the missing gradient and the step
    # after it (a step is recorded only where every parameter has a gradient), weight decay switched on, the
    # loaded state
    assert [k for k, f in enumerate(took_full) if f] == [0, 3, 4, 5, 6, 7, 8, 11], took_full


def test_repeated_step_leaves_nonfinite_and_invalid_gradients_to_the_full_step(launchers, monkeypatch):
    """A repeated step with a NaN gradient raises the full step's error naming the parameter, changing nothing (on
    CUDA the check runs on the GPU: that step stores nothing and the next ``step()`` raises, before it changes
    anything); a sparse gradient in an AdamW group (its layout was checked when gathered) gets the full step's
    error."""
    import muonkit

    _force_fused(monkeypatch, True)
    hidden = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in [(24, 16), (16, 16)]]
    emb = torch.nn.Parameter(torch.randn(10, 16, device=DEVICE))
    groups = [dict(params=hidden, param_names=["a", "b"]), dict(params=[emb], param_names=["emb"], algorithm="adamw")]
    opt = muonkit.Muon(groups, ns_dtype=torch.float32)
    for _ in range(2):
        for p in [*hidden, emb]:
            p.grad = torch.randn(p.shape, device=DEVICE)
        opt.step()
    assert opt._repeat is not None
    before = [t.detach().clone() for t in [*hidden, emb]] + [opt.state[p]["momentum_buffer"].clone() for p in hidden]
    hidden[1].grad[0, 0] = float("nan")
    if DEVICE.type == "cuda":
        opt.step()  # checked on the device: no error yet, nothing stored
    with pytest.raises(muonkit.NonFiniteGradientError, match="'b'"):
        opt.step()
    after = [t.detach() for t in [*hidden, emb]] + [opt.state[p]["momentum_buffer"] for p in hidden]
    for x, y in zip(before, after):
        assert torch.equal(x, y)
    hidden[1].grad = torch.randn(hidden[1].shape, device=DEVICE)
    opt.step()  # the full step again, then recorded again
    assert opt._repeat is not None
    emb.grad = emb.grad.to_sparse()
    with pytest.raises(ValueError, match="sparse gradient"):
        opt.step()


def _counted(calls, foreach_add, tensors, *args):
    """``torch._foreach_add_`` that records the length of each call over step counts (0-d tensors)."""
    if tensors[0].dim() == 0:
        calls.append(len(tensors))
    return foreach_add(tensors, *args)


def test_repeated_steps_advance_the_adamw_step_counts_in_one_call(launchers, monkeypatch):
    """A recorded repeat packs each AdamW group's step counts into one tensor (``stages.pack_counts``): repeated
    steps advance them with one ``add_`` (no multi-tensor call over the counts), the values stay those of the
    unpacked counts, and a state dict of packed counts saves, loads and steps on like any other."""
    import io

    import muonkit

    _force_fused(monkeypatch, True)
    foreach_add = torch._foreach_add_
    results = []
    for pack in (True, False):
        if not pack:
            monkeypatch.setattr(stages, "pack_counts", lambda states: None)
            monkeypatch.setattr(muonkit.optim.repeat, "pack_counts", lambda states: None)
        torch.manual_seed(2)
        hidden = [torch.nn.Parameter(torch.randn(16, 24, device=DEVICE))]
        other = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in [(16,), (10, 16), (3,)]]
        opt = muonkit.Muon([dict(params=hidden), dict(params=other, algorithm="adamw")], ns_dtype=torch.float32)
        calls: list[int] = []
        monkeypatch.setattr(torch, "_foreach_add_", functools.partial(_counted, calls, foreach_add))
        for _ in range(5):
            for p in hidden + other:
                p.grad = torch.randn(p.shape, device=DEVICE)
            opt.step()
        monkeypatch.setattr(torch, "_foreach_add_", foreach_add)
        counts = opt._repeat.adamw[0][3]
        assert (counts is not None) == pack
        assert calls == ([3] if pack else [3] * 5)  # the first, full step only
        assert [opt.state[p]["step"].item() for p in other] == [5.0] * 3
        if pack:
            assert stages.is_packed(counts, [opt.state[p]["step"] for p in other])
            buffer = io.BytesIO()
            torch.save(opt.state_dict(), buffer)
            buffer.seek(0)
            opt.load_state_dict(torch.load(buffer, weights_only=True))
            assert not stages.is_packed(counts, [opt.state[p]["step"] for p in other])  # loaded: the general path
        for k in range(3):
            for p in hidden + other:
                p.grad = torch.full(p.shape, 0.1 * (k + 1), device=DEVICE)
            opt.step()
        assert [opt.state[p]["step"].item() for p in other] == [8.0] * 3
        results.append([p.detach().clone() for p in hidden + other])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_no_plan_is_remembered_without_tensor_guards(launchers, monkeypatch):
    """Where torch's tensor guards are missing, every step takes the full path (and still matches the torch path)."""
    import muonkit
    from muonkit.accel import guards as _guards

    monkeypatch.setattr(_guards, "available", lambda: False)
    results = []
    for use in (False, True):
        _force_fused(monkeypatch, use)
        torch.manual_seed(8)
        ps = [torch.nn.Parameter(torch.randn(s, device=DEVICE)) for s in [(32, 16), (16, 16)]]
        opt = muonkit.Muon(ps, ns_dtype=torch.float32)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn_like(p)
            opt.step()
        assert remembered._REMEMBERED == []
        results.append([p.detach() for p in ps])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the fused path under torch.compile)")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_fused_step_matches_the_torch_path(mode):
    """The custom ops under torch.compile (and its CUDA graphs) against the eager torch path."""
    import muonkit

    torch.manual_seed(3)
    shapes = [(96, 32), (32, 96), (96, 32)]
    base = [torch.randn(s, device="cuda") for s in shapes]
    grads = [[torch.randn(s, device="cuda") for s in shapes] for _ in range(4)]
    results = []
    for fused_on, compiled in ((False, False), (True, True)):
        fused.set_fused(fused_on)
        try:
            params = [torch.nn.Parameter(b.clone()) for b in base]
            opt = muonkit.Muon(params, weight_decay=0.1, nonfinite="ignore", ns_dtype=torch.float32)
            for p, g in zip(params, grads[0]):
                p.grad = g.clone()
            opt.step()  # state created eagerly
            step = torch.compile(opt.step, mode=mode) if compiled else opt.step
            for gs in grads[1:]:
                for p, g in zip(params, gs):
                    p.grad.copy_(g)
                step()
            results.append([p.detach().clone() for p in params])
        finally:
            fused.set_fused(True)
            torch._dynamo.reset()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
