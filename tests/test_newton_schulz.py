import numpy as np
import pytest
import torch

from conftest import matrix_with_spectrum, scalar_phi, upper_only
from muonkit import coefficients as C
from muonkit import orthogonalize, polar_svd
from muonkit.newton_schulz import default_ns_dtype, uses_gram
from muonkit.reference import newton_schulz_loop

PRESETS = C.list_presets()


def svals(X):
    return torch.linalg.svdvals(X.to(torch.float64))


# ----------------------------------------------------------------------------- exact polar factor


@pytest.mark.parametrize("shape", [(40, 40), (60, 25), (25, 60), (3, 30, 20)])
def test_svd_polar_is_orthogonal_float64(shape):
    G = torch.randn(*shape, dtype=torch.float64)
    O = orthogonalize(G, method="svd")
    m, n = shape[-2:]
    k = min(m, n)
    gram = O.mT @ O if m >= n else O @ O.mT
    assert (gram - torch.eye(k, dtype=torch.float64)).abs().max() < 1e-8
    # Polar factor: O^T G is symmetric positive semi-definite (tall case).
    if m >= n:
        P = O.mT @ G
        assert torch.allclose(P, P.mT, atol=1e-8)
        assert torch.linalg.eigvalsh(P).min() > -1e-8


def test_svd_polar_rank_deficient_and_zero():
    sig = [3.0, 2.0, 1.0] + [0.0] * 7
    G = matrix_with_spectrum(20, 10, sig)
    O = polar_svd(G)
    s = svals(O)
    assert torch.allclose(s[:3], torch.ones(3, dtype=torch.float64), atol=1e-10)
    assert s[3:].abs().max() < 1e-10
    assert torch.equal(polar_svd(torch.zeros(5, 4)), torch.zeros(5, 4))


# ----------------------------------------------------------------------------- Newton-Schulz


@pytest.mark.parametrize("name", PRESETS)
def test_ns_singular_values_follow_scalar_map_exactly_in_float64(name):
    preset = C.get(name)
    sig = np.linspace(0.2, 1.0, 16)
    G = matrix_with_spectrum(24, 16, sig)
    O = orthogonalize(G, name)
    x = sig / (preset.norm_scale * np.linalg.norm(sig) + 1e-7)
    expected = np.sort(np.abs(scalar_phi(preset.schedule(), x)))[::-1]
    assert np.allclose(svals(O).numpy(), expected, atol=1e-10)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.06)])
def test_ns_singular_values_in_preset_band(name, dtype, tol):
    """Well-conditioned inputs (condition number 5): every output singular value lies in the band
    [min phi, max phi] that the scalar map gives on the normalised spectrum's range."""
    preset = C.get(name)
    sig = np.geomspace(0.2, 1.0, 32)
    G = matrix_with_spectrum(64, 32, sig, batch=(3,), dtype=torch.float32)
    O = orthogonalize(G, name, dtype=dtype)
    assert O.dtype == torch.float32
    x = np.linspace(sig.min(), sig.max(), 2001) / (preset.norm_scale * np.linalg.norm(sig))
    phi = scalar_phi(preset.schedule(), x)
    lo, hi = phi.min(), phi.max()
    s = svals(O)
    assert s.min().item() >= lo - tol, (name, s.min().item(), lo)
    assert s.max().item() <= hi + tol, (name, s.max().item(), hi)


@pytest.mark.parametrize("name", PRESETS)
def test_batched_equals_per_matrix_loop(name):
    preset = C.get(name)
    G = torch.randn(2, 3, 20, 12, dtype=torch.float64)
    O = orthogonalize(G, name)
    for i in range(2):
        for j in range(3):
            ref = newton_schulz_loop(G[i, j], preset.schedule(), norm_scale=preset.norm_scale)
            assert torch.allclose(O[i, j], ref, atol=1e-12)


@pytest.mark.parametrize("shape", [(16, 16), (40, 10), (10, 40), (5, 12, 7), (2, 3, 9, 6), (1, 50), (50, 1)])
def test_shapes_dtype_and_transpose(shape):
    G = torch.randn(*shape)
    O = orthogonalize(G)
    assert O.shape == G.shape and O.dtype == G.dtype
    # Transposing the input transposes the output (NS works on the smaller Gram matrix either way).
    assert torch.allclose(orthogonalize(G.mT.contiguous()), O.mT, atol=1e-5)


def test_converging_presets_reach_orthogonality():
    G = matrix_with_spectrum(30, 20, np.geomspace(0.05, 1, 20))
    O = orthogonalize(G, "polar_express", steps=8)
    assert (svals(O) - 1).abs().max() < 1e-3
    # Classical cubic (f'(1) = 0): quadratic convergence once past the linear start.
    assert (svals(orthogonalize(G, "bernstein", steps=20)) - 1).abs().max() < 1e-6
    # Fixed-point quintic: f'(1) = -0.98, so the error only shrinks by ~0.98 a step near 1.
    errs = [(svals(orthogonalize(G, "fixed_point_quintic", steps=k)) - 1).abs().max() for k in (12, 24, 48)]
    assert errs[0] > errs[1] > errs[2] > 0.01


def test_degree_seven_schedule_runs():
    rows = [(3.0, -4.0, 2.5, -0.5)]
    G = torch.randn(12, 9, dtype=torch.float64)
    O = orthogonalize(G, rows, steps=3)
    ref = newton_schulz_loop(G, rows * 3)
    assert torch.allclose(O, ref, atol=1e-12)


def test_zero_and_empty_inputs():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        Z = torch.zeros(4, 6, 3, dtype=dtype)
        out = orthogonalize(Z, dtype=dtype if dtype != torch.float16 else torch.float32)
        assert torch.equal(out, Z)
    assert torch.equal(orthogonalize(torch.zeros(3, 3), eps=0.0), torch.zeros(3, 3))
    for shape in [(0, 5), (5, 0), (0, 4, 4)]:
        assert orthogonalize(torch.empty(shape)).shape == shape


def test_scale_invariance_and_extreme_norms():
    G = torch.randn(24, 16)
    base = orthogonalize(G)
    for scale in (1e-3, 1e3, 1e30):
        out = orthogonalize(G * scale)
        assert torch.isfinite(out).all()
        assert torch.allclose(out, base, atol=1e-4), scale
    for dtype in (torch.bfloat16, torch.float16):
        big = (G / G.abs().max() * (1e30 if dtype == torch.bfloat16 else 6e4)).to(dtype)
        out = orthogonalize(big, dtype=torch.float32)
        assert torch.isfinite(out).all() and out.abs().max() > 0.1


def test_steps_and_schedule_repetition():
    G = torch.randn(10, 8, dtype=torch.float64)
    rows = [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]
    assert torch.allclose(orthogonalize(G, rows, steps=4), newton_schulz_loop(G, [*rows, rows[1], rows[1]]))
    assert torch.allclose(orthogonalize(G, rows), newton_schulz_loop(G, rows))


def test_default_dtype_follows_device():
    assert default_ns_dtype(torch.device("cuda"), torch.float32) == torch.bfloat16
    assert default_ns_dtype(torch.device("cpu"), torch.bfloat16) == torch.float32
    assert default_ns_dtype(torch.device("cpu"), torch.float64) == torch.float64
    # float32 on CPU by default: agrees with the float64 reference to float32 accuracy.
    G = torch.randn(32, 24)
    ref = newton_schulz_loop(G.double(), C.get("jordan").schedule())
    assert (orthogonalize(G).double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"G": torch.randn(5)}, ValueError),
        ({"G": torch.randn(3, 3, dtype=torch.complex64)}, ValueError),
        ({"G": torch.ones(3, 3, dtype=torch.int64)}, TypeError),
        ({"G": [[1.0]]}, TypeError),
        ({"G": torch.randn(3, 3), "method": "qr"}, ValueError),
        ({"G": torch.randn(3, 3), "dtype": torch.int32}, ValueError),
        ({"G": torch.randn(3, 3), "coefficients": "unknown"}, ValueError),
        ({"G": torch.randn(3, 3), "eps": -1.0}, ValueError),
        ({"G": torch.randn(3, 3), "steps": -1}, ValueError),
    ],
)
def test_bad_input(kwargs, exc):
    with pytest.raises(exc):
        orthogonalize(**kwargs)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("shape", [(24, 96), (96, 24), (2, 16, 40), (32, 32)])
@pytest.mark.parametrize("restarts", [(2,), (), (1, 3)])
def test_gram_equals_plain_newton_schulz_in_float64(name, shape, restarts):
    G = torch.randn(*shape, dtype=torch.float64)
    plain = orthogonalize(G, name)
    gram = orthogonalize(G, name, method="gram", restarts=restarts)
    assert (gram - plain).abs().max() < 1e-11


@pytest.mark.parametrize("method,restarts", [("newton_schulz", ()), ("gram", (2,)), ("gram", (1, 3)), ("gram", ())])
@pytest.mark.parametrize("name", ["jordan", "polar_express", "cubic"])
def test_unnormalised_input_with_divisors_equals_dividing_first(method, restarts, name):
    """NS on ``X / d`` given undivided ``X`` and ``d`` (the fused step's bf16 path folds ``d`` into the products):
    the same result as dividing first, for every schedule form (quintic, cubic) and restart placement."""
    from muonkit.newton_schulz.iteration import _iterate

    rows = [(1.5, -0.5)] * 5 if name == "cubic" else C.as_preset(name).schedule(5)
    torch.manual_seed(1)
    X = torch.randn(3, 16, 40, dtype=torch.float64) * torch.tensor([1e-3, 1.0, 50.0], dtype=torch.float64).view(
        -1, 1, 1
    )
    d = torch.linalg.matrix_norm(X).float() * 1.01 + 1e-7
    expected = _iterate(X / d.double().view(-1, 1, 1), rows, method, restarts)
    got = _iterate(X.clone(), rows, method, restarts, divisor=d)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert _iterate(X.clone(), [], method, restarts, divisor=d).allclose(X / d.double().view(-1, 1, 1))


@pytest.mark.parametrize(
    "method,restarts,steps",
    [
        (method, restarts, steps)
        for steps in (1, 2, 3, 5, 7)
        for method, restarts in [("newton_schulz", None)]
        + [("gram", r) for r in (None, (), (1,), (2,), (1, 2), (1, 3), (2, 4))]
        if not restarts or max(restarts) < steps  # restarts inside the schedule
    ],
)
def test_upper_tile_chain_gives_cublas_whole_matrices(method, restarts, steps, monkeypatch):
    """The upper-tile chain's bookkeeping, on the CPU: a stand-in for the GPU kernel returns upper-tile results
    with NaN in the unwritten tiles where asked (``upper_out``) and reads only the upper triangle where told
    (``upper_in``). Every matrix that cuBLAS multiplies (Q X at a restart and at the end, P X) or that a
    product reads whole must have been written whole, else NaN reaches the result; with and without divisors,
    for every restart placement."""
    from muonkit.accel import kernels
    from muonkit.newton_schulz import iteration as ns

    positions = ns.restart_positions(restarts, steps) if method == "gram" else ()
    tile = 4
    whole = kernels._whole  # the torch path's own mirroring, taken before sym_product is replaced

    def stand_in(X, alpha=1.0, beta=0.0, Y=None, diag=0.0, W=None, divisor=None, power=1, upper_in=False,
                 upper_out=False):  # fmt: skip
        if upper_in:
            X, W, Y = whole(X), None if W is None else whole(W), None if Y is None else whole(Y)
        for T in (X, W, Y):
            assert T is None or not T.isnan().any(), "a product read a tile nobody wrote"
        out = alpha * X @ (X if W is None else W).mT + diag * torch.eye(X.shape[-2], dtype=X.dtype)
        if Y is not None:
            out = out + beta * Y
        if divisor is not None:
            out = out / divisor.double().view(-1, 1, 1) ** power
        return upper_only(out, tile) if upper_out else out

    rows = C.as_preset("polar_express").schedule(steps)
    X = torch.randn(3, 10, 26, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    d = torch.linalg.matrix_norm(X).float() * 1.01
    want = ns._iterate(X.clone(), rows, method, positions, divisor=d)
    monkeypatch.setattr(kernels, "use_kernel", lambda X, has_y=False: True)
    monkeypatch.setattr(kernels, "upper_chain", lambda X: True)
    monkeypatch.setattr(kernels, "sym_product", stand_in)
    for divisor in (d, None):
        got = ns._iterate(X.clone() if divisor is not None else X / d.double().view(-1, 1, 1), rows, method,
                          positions, divisor=divisor)  # fmt: skip
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_gram_restarts_default_follows_the_step_count():
    """The measured placements (one restart up to 6 steps, then every second step from step 3), and
    ``restarts=None`` runs exactly those."""
    from muonkit.newton_schulz import gram_restarts

    assert [gram_restarts(k) for k in range(1, 11)] == [
        (), (), (2,), (3,), (3,), (3,), (3, 5), (3, 5, 7), (3, 5, 7), (3, 5, 7, 9)
    ]  # fmt: skip
    G = torch.randn(2, 32, 96)
    for steps in (3, 5, 8):
        default = orthogonalize(G, "jordan", steps=steps, method="gram", dtype=torch.bfloat16)
        explicit = orthogonalize(G, "jordan", steps=steps, method="gram", dtype=torch.bfloat16,
                                 restarts=gram_restarts(steps))  # fmt: skip
        assert torch.equal(default, explicit)
    other = orthogonalize(G, "jordan", steps=5, method="gram", dtype=torch.bfloat16, restarts=(2,))
    assert not torch.equal(other, orthogonalize(G, "jordan", steps=5, method="gram", dtype=torch.bfloat16))


@pytest.mark.parametrize("restarts", [(0,), (5,), (-1,), (1.5,), (True,), ("2",)])
@pytest.mark.parametrize("method", ["gram", "newton_schulz"])
def test_restart_positions_outside_the_schedule_raise(restarts, method):
    with pytest.raises(ValueError, match="restarts must be step indices between 1 and 4"):
        orthogonalize(torch.randn(8, 24), "jordan", steps=5, method=method, restarts=restarts)


@pytest.mark.parametrize("name", ["jordan", "polar_express"])
def test_default_restart_keeps_bf16_gram_near_plain_on_ill_conditioned_input(name):
    """Singular values spread over [1e-4, 1] in bf16: the default restart (before step 3 of 5) stays within 1.3x
    of plain NS's error against float64, where Dao-AILab's placement before step 2 is at least 1.2x worse than the
    default (2-core CPU: jordan 0.070 vs 0.153, plain 0.088; polar_express 0.155 vs 0.205, plain 0.131)."""
    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(2, 128, 128, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(2, 512, 128, generator=gen, dtype=torch.float64))
    G = (U * torch.logspace(-4, 0, 128, dtype=torch.float64)) @ V.mT
    ref = orthogonalize(G, name, dtype=torch.float64)

    def error(**kwargs):
        out = orthogonalize(G.float(), name, dtype=torch.bfloat16, **kwargs).double()
        return float((out - ref).norm() / ref.norm())

    plain, default, dao = error(), error(method="gram"), error(method="gram", restarts=(2,))
    assert default < 1.3 * plain
    assert 1.2 * default < dao


def test_gram_half_precision_error_close_to_plain():
    G = torch.randn(4, 64, 256)
    ref = orthogonalize(G.double(), "polar_express")
    for dtype, limit in ((torch.bfloat16, 2.5), (torch.float16, 3.0)):
        rel = lambda O: ((O.double() - ref).norm() / ref.norm()).item()
        plain = rel(orthogonalize(G, "polar_express", dtype=dtype))
        gram = rel(orthogonalize(G, "polar_express", dtype=dtype, method="gram"))
        assert gram < limit * plain + 1e-3, (dtype, gram, plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_gram_on_cuda_with_each_kernel_mode(mode):
    """Gram NS on a GPU, its symmetric products on cuBLAS or on the Triton kernel (X X^T, the polynomial and the
    Q and R updates): as accurate as plain NS in the same precision (as above)."""
    from muonkit.accel import kernels

    G = torch.randn(4, 256, 1024, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    ref = orthogonalize(G.double(), "jordan", dtype=torch.float64)
    before = kernels.get_mode()
    kernels.set_mode(mode)
    try:
        for dtype, limit in ((torch.bfloat16, 2.5), (torch.float16, 3.0)):
            rel = lambda O: ((O.double() - ref).norm() / ref.norm()).item()
            plain = rel(orthogonalize(G, "jordan", dtype=dtype, method="newton_schulz"))
            gram = rel(orthogonalize(G, "jordan", dtype=dtype, method="gram"))
            assert gram < limit * plain + 1e-3, (dtype, gram, plain)
    finally:
        kernels.set_mode(before)


@pytest.mark.parametrize(
    "method,device,shape,gram",
    [
        ("auto", "cuda", (24, 768, 3072), True),
        ("auto", "cuda", (24, 3072, 768), True),  # transposed alike
        ("auto", "cuda", (1, 768, 3072), True),  # b m n^2 = 7.2e9
        ("auto", "cuda", (8, 768, 1536), True),  # GRAM_MIN_ASPECT = 2
        ("auto", "cuda", (8, 768, 1535), False),
        ("auto", "cuda", (1, 1024, 2560), False),  # too little work: b m n^2 = 6.7e9
        ("auto", "cuda", (2, 3, 1024, 2560), True),  # every leading dim counts in b
        ("auto", "cuda", (64, 768, 768), False),
        ("auto", "cpu", (24, 768, 3072), False),  # CPU keeps plain NS
        ("gram", "cpu", (1, 8, 9), True),
        ("gram", "cuda", (4, 64, 64), False),  # square: Gram NS saves nothing
        ("newton_schulz", "cuda", (24, 768, 3072), False),
    ],
)
def test_which_method_runs_gram_ns(method, device, shape, gram):
    assert uses_gram(method, shape, torch.device(device)) is gram


def test_default_method_on_cpu_is_plain_newton_schulz_bit_for_bit():
    G = torch.randn(3, 32, 128, generator=torch.Generator().manual_seed(0))
    assert torch.equal(orthogonalize(G), orthogonalize(G, method="newton_schulz"))
    assert not torch.equal(orthogonalize(G, method="gram"), orthogonalize(G, method="newton_schulz"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_default_method_on_cuda_is_gram_for_large_wide_batches_and_plain_otherwise():
    gen = torch.Generator("cuda").manual_seed(2)
    wide = torch.randn(8, 768, 1536, device="cuda", generator=gen)
    small, square = wide[:1, :256, :512], torch.randn(4, 128, 128, device="cuda")
    for G, same in ((wide, "gram"), (wide.mT, "gram"), (small, "newton_schulz"), (square, "newton_schulz")):
        other = "newton_schulz" if same == "gram" else "gram"
        assert torch.equal(orthogonalize(G), orthogonalize(G, method=same)), same
        if same == "gram":
            assert not torch.equal(orthogonalize(G), orthogonalize(G, method=other))


def test_gradients_flow_through_orthogonalize():
    """Autograd through NS (float64, CPU): the analytic gradient matches finite differences."""
    G = torch.randn(2, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert torch.autograd.gradcheck(lambda G: orthogonalize(G, steps=3), (G,))
    assert torch.autograd.gradcheck(lambda G: orthogonalize(G, steps=3, method="gram"), (G,))


def test_the_iterations_free_the_input_they_are_handed_once_spent(monkeypatch):
    """``_iterate`` keeps no reference to the batch it is handed: where the caller keeps none either (the fused
    step's ``orthogonalize_filled``), the input is freed after the first step, one batch-sized buffer less at the
    iterations' peak; a caller that keeps its own reference keeps its input, unchanged."""
    import weakref

    from muonkit.newton_schulz import iteration

    alive = []
    real = iteration._poly_in_gram
    spy = lambda A, higher: alive.append(ref() is not None) or real(A, higher)
    monkeypatch.setattr(iteration, "_poly_in_gram", spy)
    rows = [[3.4445, -4.775, 2.0315]] * 3
    X = torch.randn(2, 8, 16) / 8
    kept = X.clone()
    ref = weakref.ref(X)
    held = [X]
    del X
    out = iteration._iterate(held.pop(), rows, "newton_schulz", ())
    assert alive == [True, False, False]
    alive.clear()
    ref = weakref.ref(kept)
    again = iteration._iterate(kept, rows, "newton_schulz", ())
    assert alive == [True, True, True] and torch.equal(out, again)
