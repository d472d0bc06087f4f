"""The symmetric-product kernel switch: CPU always takes torch; on a GPU the Triton kernel matches torch."""

import math

import pytest
import torch

import muonkit
from conftest import stand_in_timing, upper_only
from muonkit.accel import kernels

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _restore_mode():
    before = kernels.get_mode()
    yield
    kernels.set_mode(before)


def test_modes_are_validated():
    with pytest.raises(ValueError, match="kernel mode"):
        kernels.set_mode("cuda")


def test_cpu_falls_back_to_torch_bit_for_bit_in_auto_mode():
    G = torch.randn(3, 300, 500, generator=torch.Generator().manual_seed(0))
    kernels.set_mode("torch")
    want = muonkit.orthogonalize(G)
    want_gram = muonkit.orthogonalize(G, method="gram")
    kernels.set_mode("auto")
    assert not kernels.triton_applies(G)
    assert torch.equal(muonkit.orthogonalize(G), want)
    assert torch.equal(muonkit.orthogonalize(G, method="gram"), want_gram)


def test_triton_mode_refuses_what_it_cannot_run():
    kernels.set_mode("triton")
    with pytest.raises(RuntimeError, match="cannot take"):
        muonkit.orthogonalize(torch.randn(300, 400))


def test_sym_product_fallback_formula():
    X = torch.randn(2, 5, 7, dtype=torch.float64)
    Y = X @ X.mT
    assert torch.allclose(kernels.sym_product(X, 2.0), 2 * X @ X.mT)
    assert torch.allclose(kernels.sym_product(X, 2.0, 0.5, Y), 2 * X @ X.mT + 0.5 * Y)
    eye = torch.eye(5, dtype=torch.float64)
    assert torch.allclose(kernels.sym_product(X, 2.0, 0.5, Y, diag=3.0), 2 * X @ X.mT + 0.5 * Y + 3 * eye)
    A = Y  # symmetric; polynomials in it commute, so A (A A) is symmetric
    assert torch.allclose(kernels.sym_product(A, 2.0, W=A @ A), 2 * A @ A @ A)
    assert torch.allclose(kernels.sym_product(A, 2.0, 0.5, Y, diag=1.0, W=A), 2 * A @ A + 0.5 * Y + torch.eye(5))


def test_sym_product_divisor_on_the_torch_path_and_its_checks():
    X = torch.randn(3, 5, 7, dtype=torch.float32)
    d = torch.tensor([0.5, 2.0, 3.0])
    Y = X @ X.mT
    assert torch.allclose(kernels.sym_product(X, divisor=d, power=2), X @ X.mT / d.view(-1, 1, 1) ** 2)
    poly = kernels.sym_product(Y, 2.0, 0.5, Y, diag=1.0, divisor=d)
    assert torch.allclose(poly, (2 * Y @ Y + 0.5 * Y + torch.eye(5)) / d.view(-1, 1, 1), rtol=1e-5)
    with pytest.raises(ValueError, match="divisor"):
        kernels.sym_product(X, divisor=d, power=3)
    with pytest.raises(ValueError, match="divisor"):
        kernels.sym_product(X, divisor=d[:2])


@pytest.mark.gpu
@cuda
def test_triton_sym_product_divisor():
    """The kernel's float32 epilogue divides each matrix's result by its divisor (or its square)."""
    if not kernels.triton_applies(torch.empty(1, 8, 8, device="cuda", dtype=torch.bfloat16)):
        pytest.skip("no Triton or an older GPU")
    kernels.set_mode("triton")
    X = torch.randn(3, 256, 512, device="cuda", dtype=torch.bfloat16)
    d = torch.tensor([20.0, 0.5, 3.0], device="cuda")
    ref = (X.double() @ X.double().mT) / d.double().view(-1, 1, 1) ** 2
    out = kernels.sym_product(X, divisor=d, power=2)
    assert torch.equal(out, out.mT)
    assert ((out.double() - ref).abs().amax(dim=(1, 2)) < 1e-2 * ref.abs().amax(dim=(1, 2))).all()
    A = (X @ X.mT / 512).contiguous()
    ref = (1.5 * A.double() @ A.double() - 0.5 * A.double() + torch.eye(256, device="cuda")) / d.double().view(-1, 1, 1)
    out = kernels.sym_product(A, alpha=1.5, beta=-0.5, Y=A, diag=1.0, divisor=d)
    assert ((out.double() - ref).abs().amax(dim=(1, 2)) < 1e-2 * ref.abs().amax(dim=(1, 2))).all()


def _commuting_pair(b, m, dtype, device):
    """Two symmetric matrices that commute (polynomials in one), scaled to entries of order 1."""
    gen = torch.Generator(device=device).manual_seed(4)
    X = torch.randn(b, m, 2 * m, device=device, generator=gen, dtype=torch.float64) / (2 * m) ** 0.5
    R = X @ X.mT / 4
    P = 1.5 * torch.eye(m, device=device, dtype=torch.float64) - R + 0.5 * R @ R
    return P.to(dtype), R.to(dtype)


@pytest.mark.gpu
@cuda
def test_triton_sym_product_with_a_second_factor():
    """``P R`` for commuting symmetric P, R (Gram NS's updates) on the Triton kernel: one triangle, mirrored.
    (Not on Triton's CPU interpreter: its loop over a runtime ``tl.cdiv`` fails there, Triton 3.6.)"""
    if not kernels.triton_applies(torch.empty(1, 8, 8, device="cuda", dtype=torch.float16)):
        pytest.skip("no Triton or an older GPU")
    P, R = _commuting_pair(2, 160, torch.float16, "cuda")  # 160 rows: two 128-row tiles, a ragged edge
    kernels.set_mode("triton")
    out = kernels.sym_product(P, W=R)
    ref = P.double() @ R.double()
    assert torch.equal(out, out.mT)
    assert (out.double() - ref).abs().max() < 2e-3 * ref.abs().max()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("shape", [(4, 256, 256), (2, 300, 1000), (1, 1000, 3000), (3, 513, 64)])
def test_triton_sym_product_matches_torch_and_is_symmetric(shape):
    if not kernels.triton_applies(torch.empty(shape, device="cuda", dtype=torch.bfloat16)):
        pytest.skip("no Triton or an older GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    X = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) / shape[-1] ** 0.5
    kernels.set_mode("triton")
    A = kernels.sym_product(X)
    ref = X.float() @ X.float().mT
    assert torch.equal(A, A.mT)
    assert (A.float() - ref).abs().max() < 2e-2 * ref.abs().max()
    B = kernels.sym_product(A, alpha=-4.775, beta=3.4445, Y=A, diag=1.5)
    ref_b = 3.4445 * A.float() - 4.775 * A.float() @ A.float() + 1.5 * torch.eye(shape[1], device="cuda")
    assert torch.equal(B, B.mT)
    assert (B.float() - ref_b).abs().max() < 2e-2 * ref_b.abs().max()


def test_tuner_skips_configurations_the_gpu_has_no_room_for(monkeypatch):
    """A configuration whose shared memory the GPU lacks (Triton raises at its first launch) is skipped, not
    fatal; none fitting is a clear error. CUDA events stand in for timing (CPU)."""
    errors = pytest.importorskip("triton.runtime.errors")
    ms = {(128, 64, 8, 3): 3.0, (128, 64, 8, 4): 2.0, (128, 64, 8, 5): 1.0, (128, 64, 4, 3): 2.5}
    assert set(ms) == set(kernels.CONFIGS)
    too_big = {(128, 64, 8, 5)}  # the fastest, were there room for it
    last: list = []

    def run(cfg):
        if cfg in too_big:
            raise errors.OutOfResources(160 * 1024, 100 * 1024, "shared memory")
        last.append(cfg)

    stand_in_timing(monkeypatch, lambda: ms[last[-1]])
    assert kernels._tune(run, (1, 768, 768, True, torch.bfloat16, False, True)) == (128, 64, 8, 4)
    too_big = set(ms)
    with pytest.raises(RuntimeError, match="no tile configuration"):
        kernels._tune(run, (2, 768, 768, True, torch.bfloat16, False, True))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("cfg", kernels.CONFIGS, ids=str)
def test_every_tile_configuration_computes_the_same_products(cfg, monkeypatch):
    """Each configuration the tuner may choose, forced: on matrices smaller than a tile,
    ending inside a tile, spanning an odd number of 128-row tiles and dividing evenly, X X^T, the step
    polynomial, a product with a second factor and a divisor are exactly symmetric and close to float64."""
    if not kernels.triton_applies(torch.empty(1, 8, 8, device="cuda", dtype=torch.float16)):
        pytest.skip("no Triton or an older GPU")
    monkeypatch.setattr(kernels, "CONFIGS", (cfg,))
    monkeypatch.setattr(kernels, "_best", {})
    kernels.set_mode("triton")
    gen = torch.Generator(device="cuda").manual_seed(1)
    for b, m, k in [(2, 100, 64), (3, 384, 200), (2, 640, 320), (1, 768, 1536), (2, 300, 1000)]:
        X = (torch.randn(b, m, k, device="cuda", generator=gen, dtype=torch.float64) / k**0.5).half()
        d = torch.rand(b, device="cuda", generator=gen) + 0.5
        A = kernels.sym_product(X, divisor=d, power=2)
        ref = X.double() @ X.double().mT / d.double().view(-1, 1, 1) ** 2
        assert torch.equal(A, A.mT)
        assert (A.double() - ref).abs().max() < 2e-3 * ref.abs().max(), (b, m, k)
        B = kernels.sym_product(A, alpha=-4.775, beta=3.4445, Y=A, diag=1.5)
        Ad = A.double()
        ref = 3.4445 * Ad - 4.775 * Ad @ Ad + 1.5 * torch.eye(m, device="cuda", dtype=torch.float64)
        assert torch.equal(B, B.mT)
        assert (B.double() - ref).abs().max() < 2e-3 * ref.abs().max(), (b, m, k)
        C = kernels.sym_product(B, W=A)  # B is a polynomial in A: B A is symmetric
        ref = B.double() @ Ad
        assert torch.equal(C, C.mT)
        assert (C.double() - ref).abs().max() < 2e-3 * ref.abs().max(), (b, m, k)
    assert set(kernels._best.values()) == {cfg}


def test_upper_inputs_on_the_torch_path_are_made_whole():
    """Where the kernel does not run (CPU), ``upper_in`` inputs are mirrored from their upper triangle first,
    so a result never depends on the unwritten tiles; ``upper_out`` results are whole there."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(2, 6, 9, generator=gen, dtype=torch.float64)
    A = X @ X.mT
    A = (A + A.mT) / 2
    P = 2.0 * A @ A - A + 0.5 * torch.eye(6, dtype=torch.float64)
    U, V = upper_only(A, 2), upper_only(P, 2)
    assert torch.allclose(kernels.sym_product(U, 2.0, -1.0, U, diag=0.5, upper_in=True), P)
    assert torch.allclose(kernels.sym_product(V, W=U, upper_in=True, upper_out=True), P @ A)
    assert torch.allclose(kernels.sym_product(X, upper_out=True), A)
    with pytest.raises(ValueError, match="square"):
        kernels.sym_product(X, upper_in=True)
    assert not kernels.upper_chain(A)  # CPU: no kernel, no upper storage


def test_tuner_gives_upper_storage_calls_only_upper_tile_sized_tiles(monkeypatch):
    """A matrix stored in upper tiles is read right only with the tile size it was written with: calls with
    ``upper_in`` or without the mirror choose among UPPER_TILE configurations; none left is a clear error."""
    pytest.importorskip("triton")
    monkeypatch.setattr(kernels, "CONFIGS", ((64, 64, 4, 3), (128, 64, 8, 3), (128, 256, 8, 3)))
    tried: list = []
    stand_in_timing(monkeypatch, lambda: {(64, 64, 4, 3): 1.0, (128, 64, 8, 3): 2.0}.get(tried[-1], 3.0))
    assert kernels._tune(tried.append, (1, 768, 768, True, torch.bfloat16, False, True)) == (64, 64, 4, 3)
    tried.clear()
    assert kernels._tune(tried.append, (1, 768, 768, True, torch.bfloat16, True, False)) == (128, 64, 8, 3)
    assert set(tried) == {(128, 64, 8, 3)}  # (128, 256): a K step wider than the tile is not allowed either
    assert kernels._tune(tried.append, (1, 768, 3072, False, torch.bfloat16, False, False)) == (128, 64, 8, 3)
    monkeypatch.setattr(kernels, "CONFIGS", ((64, 64, 4, 3),))
    with pytest.raises(RuntimeError, match="128 x 128 tiles"):
        kernels._tune(tried.append, (2, 768, 768, True, torch.bfloat16, True, True))


def test_compile_ahead_runs_the_tuning_pass_without_launches_and_never_stops_a_build(monkeypatch):
    """``kernels._compile_ahead``: inside Triton's ``AsyncCompileMode`` (on a thread pool) it runs the pretune pass
    on unwritten tensors with ``compiling_ahead()`` on, so the launcher compiles instead of launching; a failure
    there stops nothing (the timing pass compiles again and reports); with a Triton that lacks the mode it does
    nothing. ``ahead_configs``: a known choice alone, else every candidate the tuner will time."""
    import sys
    import types

    entered = []

    class Mode:
        def __init__(self, pool):
            self.pool = pool

        def __enter__(self):
            entered.append(self.pool)
            return self

        def __exit__(self, *exc):
            return False

    seen = []

    def tuning_pass(batches, dtype, device, real=True):
        seen.append((real, kernels.compiling_ahead()))
        raise RuntimeError("a compile failed")

    monkeypatch.setattr(kernels, "_pretune_pass", tuning_pass)
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(AsyncCompileMode=Mode))
    kernels._compile_ahead([(2, 256, 512)], torch.bfloat16, torch.device("cpu"))
    assert seen == [(False, True)] and len(entered) == 1 and not kernels.compiling_ahead()
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace())  # no AsyncCompileMode: nothing ahead
    kernels._compile_ahead([(2, 256, 512)], torch.bfloat16, torch.device("cpu"))
    assert len(seen) == 1

    monkeypatch.setattr(kernels, "_best", {})
    monkeypatch.setattr(kernels._Disk, "loaded", True)
    key = (2, 256, 512, True, torch.bfloat16, False, True, "a GPU")
    assert kernels.ahead_configs(key) == kernels.candidates(key) == list(kernels.CONFIGS)
    kernels._best[key] = kernels.CONFIGS[2]
    assert kernels.ahead_configs(key) == [kernels.CONFIGS[2]]
    upper = (2, 256, 256, True, torch.bfloat16, True, False, "a GPU")
    assert all(c[0] == kernels.UPPER_TILE for c in kernels.ahead_configs(upper))


def test_tuned_choices_are_bounded_oldest_first(monkeypatch):
    """The tuner's memory of choices holds at most ``_MAX_BEST`` shapes: a new one drops the oldest."""
    pytest.importorskip("triton")
    monkeypatch.setattr(kernels, "_best", {})
    monkeypatch.setattr(kernels, "_MAX_BEST", 3)
    tried: list = []
    stand_in_timing(monkeypatch, lambda: 1.0)
    keys = [(b, 768, 768, True, torch.bfloat16, False, True, "gpu") for b in range(1, 6)]
    for key in keys:
        kernels._tune(tried.append, key)
    assert list(kernels._best) == keys[2:]
    before = len(tried)
    kernels._tune(tried.append, keys[-1])  # remembered: not timed again
    assert len(tried) == before


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("cfg", [c for c in kernels.CONFIGS if c[0] == kernels.UPPER_TILE], ids=str)
def test_upper_tile_storage_gives_the_same_bits(cfg, monkeypatch):
    """Each UPPER_TILE configuration, forced: a product writing upper tiles only matches the whole product's
    upper tiles bit for bit, and products reading upper tiles only (the others NaN, so any stray read shows)
    match the whole products, on sizes smaller than a tile, ending inside one and dividing evenly."""
    if not kernels.triton_applies(torch.empty(1, 8, 8, device="cuda", dtype=torch.float16)):
        pytest.skip("no Triton or an older GPU")
    monkeypatch.setattr(kernels, "CONFIGS", (cfg,))
    monkeypatch.setattr(kernels, "_best", {})
    kernels.set_mode("triton")
    t = kernels.UPPER_TILE
    gen = torch.Generator(device="cuda").manual_seed(2)
    for b, m, k in [(2, 100, 64), (3, 300, 700), (2, 640, 640), (2, 768, 1536)]:
        X = (torch.randn(b, m, k, device="cuda", generator=gen) / k**0.5).bfloat16()
        A = kernels.sym_product(X)
        blocks = ~upper_only(torch.zeros(m, m, device="cuda"), t).isnan()
        assert torch.equal(kernels.sym_product(X, upper_out=True)[:, blocks], A[:, blocks]), (b, m, k)
        P = kernels.sym_product(A, alpha=2.03, beta=-4.77, Y=A, diag=3.44)
        Pu = kernels.sym_product(upper_only(A, t), alpha=2.03, beta=-4.77, Y=upper_only(A, t), diag=3.44,
                                 upper_in=True)  # fmt: skip
        assert torch.equal(Pu, P), (b, m, k)
        Q = kernels.sym_product(P, W=A)
        Qu = kernels.sym_product(upper_only(P, t), W=upper_only(A, t), upper_in=True, upper_out=True)
        assert torch.equal(Qu[:, blocks], Q[:, blocks]), (b, m, k)
    assert set(kernels._best.values()) == {cfg}


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("method", ["newton_schulz", "gram"])
def test_ns_with_upper_tile_storage_gives_the_same_bits(method, monkeypatch):
    """Plain and Gram NS with the m x m intermediates in upper tiles only give the same bits as with whole
    matrices (the same sums in the same order), on the GPU's auto path, for shapes that take it and not."""
    X = torch.randn(6, 768, 2304, device="cuda", generator=torch.Generator(device="cuda").manual_seed(4))
    if not kernels.triton_applies(X.bfloat16()):
        pytest.skip("no Triton or an older GPU")
    kernels.set_mode("triton")
    assert kernels.upper_chain(X[..., :768].bfloat16())
    monkeypatch.setattr(kernels, "UPPER", False)
    want = muonkit.orthogonalize(X, method=method)
    monkeypatch.setattr(kernels, "UPPER", True)
    assert torch.equal(muonkit.orthogonalize(X, method=method), want)
    err = (want.double() - muonkit.orthogonalize(X, method="svd").double()).norm() / want.double().norm()
    assert err < 0.3  # Jordan's coefficients end in about [0.7, 1.2]: not the polar factor, but near it


@pytest.mark.gpu
@cuda
def test_triton_kernel_runs_inside_torch_compile():
    X = torch.randn(4, 384, 1024, device="cuda", dtype=torch.bfloat16) / 32
    if not kernels.triton_applies(X):
        pytest.skip("no Triton or an older GPU")
    kernels.set_mode("triton")
    eager = kernels.sym_product(X, diag=0.5)
    if not kernels._compile_ok:
        pytest.skip("torch.library.triton_op is missing (torch < 2.6)")
    compiled = torch.compile(lambda x: kernels.sym_product(x, diag=0.5), fullgraph=True)(X)
    assert torch.equal(compiled, eager)


@pytest.mark.gpu
@cuda
def test_ns_with_the_kernel_stays_in_the_band():
    if not kernels.triton_applies(torch.empty(1, 512, 512, device="cuda", dtype=torch.bfloat16)):
        pytest.skip("no Triton or an older GPU")
    G = torch.randn(4, 512, 1536, device="cuda")
    kernels.set_mode("torch")
    want = muonkit.orthogonalize(G).float()
    kernels.set_mode("triton")
    got = muonkit.orthogonalize(G).float()
    s = torch.linalg.svdvals(got)
    assert s.min() > 0.5 and s.max() < 1.3
    assert (got - want).abs().max() < 0.05


@pytest.mark.gpu
@cuda
def test_auto_mode_uses_the_kernel_only_for_large_matrices():
    big = torch.empty(1, 4096, 4096, device="cuda", dtype=torch.bfloat16)
    small = torch.empty(8, kernels.AUTO_MIN_ROWS - 1, 64, device="cuda", dtype=torch.bfloat16)
    kernels.set_mode("auto")
    assert not kernels.use_kernel(small)
    assert kernels.use_kernel(big) == kernels.triton_applies(big)
    G = torch.randn(kernels.AUTO_MIN_ROWS, 4096, device="cuda")
    eager = muonkit.orthogonalize(G)
    compiled = torch.compile(lambda g: muonkit.orthogonalize(g))(G)
    assert (eager.float() - compiled.float()).abs().max() < 0.05


def test_ns_batches_match_the_jobs_a_step_makes():
    from muonkit.optim.stages import ns_batches

    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072), (768, 3072), (64, 8, 3, 3)]
    # (3072, 768) and (768, 3072) are separate batches: transposing costs more than a second call saves
    assert ns_batches(shapes) == [(1, 768, 2304), (1, 768, 768), (1, 768, 3072), (2, 768, 3072), (1, 64, 72)]
    assert ns_batches(shapes[:1], split=3) == [(3, 768, 768)]
    assert ns_batches([(512, 512)] * 5, max_batch=2) == [(2, 512, 512), (2, 512, 512), (1, 512, 512)]
    assert ns_batches([(4, 16, 32)], matrix_view="batch") == [(4, 16, 32)]


def test_pretune_does_nothing_without_the_kernel():
    assert kernels.pretune([(2, 768, 768)], torch.bfloat16, torch.device("cpu")) == 0
    assert kernels.pretune([(2, 768, 768)], torch.float32, torch.device("cpu")) == 0


def _filling(m: int) -> int:
    """The fewest ``m``-row matrices per call that auto mode gives the kernel (``kernels.AUTO_MIN_FILL``)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return math.ceil(kernels.AUTO_MIN_FILL * sms / kernels.upper_tiles(1, m))


def test_auto_mode_asks_for_enough_tiles_to_fill_the_gpu(monkeypatch):
    """The decision alone (CPU: the kernel's availability and the SM count stood in): a call takes the kernel in
    auto mode only where its upper tiles reach ``AUTO_MIN_FILL`` of the SMs; modes ``triton`` and ``torch``
    ignore the count."""
    monkeypatch.setattr(kernels, "triton_applies", lambda X: True)
    monkeypatch.setattr(kernels, "_sms", lambda device: 132)
    assert kernels.upper_tiles(1, 768) == 21 and kernels.upper_tiles(2, 769) == 56 and kernels.upper_tiles(3, 1) == 3
    need = math.ceil(kernels.AUTO_MIN_FILL * 132)
    kernels.set_mode("auto")
    with kernels.capture_warmup():
        for b in (1, 2, 3, 6):
            X = torch.empty(b, 768, 1024)
            assert kernels.use_kernel(X, has_y=True) == (21 * b >= need), b
            assert kernels.use_kernel(X) == (21 * b >= need), b
        kernels.set_mode("triton")
        assert kernels.use_kernel(torch.empty(1, 768, 1024))
    kernels.set_mode("torch")
    assert not kernels.use_kernel(torch.empty(64, 768, 1024))


@cuda
def test_optimizer_tunes_its_batches_before_the_first_step():
    kernels.set_mode("auto")
    kernels._best.clear()
    b = _filling(512)
    shapes = [(1536, 512)] * b + [(512, 512)] * b + [(256, 256)] * 64 + [(2048, 2048)] * _filling(2048)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    muonkit.Muon(params, split=None, max_batch=1 << 30)
    tuned = {(k[0], k[1], k[2], k[3]) for k in kernels._best}
    # (b, m, k, has Y): the step polynomial of each batch of >= AUTO_MIN_ROWS rows, X X^T alone from
    # AUTO_XXT_MIN_ROWS rows, nothing for the 256-row matrices
    assert kernels.AUTO_MIN_ROWS == kernels.AUTO_XXT_MIN_ROWS == 512
    c = _filling(2048)
    want = {(b, 512, 512, True), (b, 512, 1536, False), (b, 512, 512, False), (c, 2048, 2048, True),
            (c, 2048, 2048, False)}  # fmt: skip
    assert tuned == want
    # and each on upper-tile storage as a CUDA-graph-captured step runs them: (upper_in, mirror)
    assert {k[5:7] for k in kernels._best} == {(False, True), (False, False), (True, False), (True, True)}
    assert {k[7] for k in kernels._best} == {torch.cuda.get_device_name()}  # keyed by the GPU model too


@pytest.mark.gpu
@cuda
def test_auto_mode_leaves_calls_too_small_to_fill_the_gpu_to_cublas():
    kernels.set_mode("auto")
    b = _filling(768)
    with kernels.capture_warmup():  # decide as under capture
        assert kernels.use_kernel(torch.empty(b, 768, 768, device="cuda", dtype=torch.bfloat16), has_y=True)
        assert not kernels.use_kernel(torch.empty(b - 1, 768, 768, device="cuda", dtype=torch.bfloat16), has_y=True)
        assert not kernels.use_kernel(torch.empty(1, 768, 3072, device="cuda", dtype=torch.bfloat16))
    G = torch.randn(3072, 768, device="cuda")  # a single matrix: NS on cuBLAS, the same polar factor
    kernels.set_mode("triton")
    forced = muonkit.orthogonalize(G).float()
    kernels.set_mode("auto")
    assert (muonkit.orthogonalize(G).float() - forced).abs().max() < 0.05


@pytest.mark.gpu
@cuda
def test_auto_mode_row_thresholds():
    kernels.set_mode("auto")
    b = 4 * _filling(kernels.AUTO_MIN_ROWS)  # enough matrices to fill the GPU below the thresholds too
    at = torch.empty(b, kernels.AUTO_MIN_ROWS, 1024, device="cuda", dtype=torch.bfloat16)
    below = torch.empty(b, kernels.AUTO_XXT_MIN_ROWS - 1, 1024, device="cuda", dtype=torch.bfloat16)
    with kernels.capture_warmup():  # decide as under capture
        assert kernels.use_kernel(at, has_y=True)
        assert kernels.use_kernel(torch.empty(b, kernels.AUTO_XXT_MIN_ROWS, 64, device="cuda", dtype=torch.bfloat16))
        assert not kernels.use_kernel(below)
        assert not kernels.use_kernel(below[:, : kernels.AUTO_MIN_ROWS - 1], has_y=True)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_frobenius_norm_kernel_matches_float64_torch(dtype):
    kernels.set_mode("auto")
    gen = torch.Generator(device="cuda").manual_seed(0)
    G = torch.randn(5, 300, 7000, device="cuda", generator=gen).to(dtype)
    want = torch.linalg.vector_norm(G.double(), dim=(-2, -1), keepdim=True)
    for x in (G, G.mT):  # a transposed view is read in place
        got = kernels.frobenius_norms(x)
        assert got.dtype == torch.float64 and got.shape == (5, 1, 1)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert torch.equal(kernels.frobenius_norms(G), kernels.frobenius_norms(G))  # deterministic
    assert kernels.frobenius_norms(G[:0]).shape == (0, 1, 1)


@cuda
def test_frobenius_norm_kernel_keeps_tiny_and_huge_float32():
    kernels.set_mode("auto")
    base = torch.randn(3, 64, 96, device="cuda", dtype=torch.float64)
    for scale in (1e-30, 1e30):
        G = (base * scale).float()
        want = torch.linalg.vector_norm(G.double(), dim=(-2, -1), keepdim=True)
        torch.testing.assert_close(kernels.frobenius_norms(G), want, rtol=1e-12, atol=0)
    strided = torch.randn(3, 64, 192, device="cuda")[:, :, ::2]  # not dense: torch computes it
    torch.testing.assert_close(
        kernels.frobenius_norms(strided), torch.linalg.vector_norm(strided.double(), dim=(-2, -1), keepdim=True)
    )


def test_one_switch_turns_every_acceleration_off_and_back(monkeypatch):
    """``MUONKIT_ACCEL`` (on unless 0 / false / off) and ``accel.disabled()``, which restores what was set before."""
    from muonkit import accel
    from muonkit.accel import cuda_graphs, fused

    for value, on in ((None, True), ("0", False), ("false", False), ("OFF", False), ("1", True), ("yes", True)):
        if value is None:
            monkeypatch.delenv(accel.ENV, raising=False)
        else:
            monkeypatch.setenv(accel.ENV, value)
        assert accel.from_env() is on, value
    fused.set_fused(False)  # a finer setting made before is kept
    try:
        with accel.disabled():
            assert kernels.get_mode() == "torch" and not fused.fused_enabled()
            assert not cuda_graphs.cuda_graphs_enabled()
            assert not kernels.prepare() and not fused.prepare()
        assert kernels.get_mode() == "auto" and not fused.fused_enabled() and cuda_graphs.cuda_graphs_enabled()
    finally:
        fused.set_fused(True)
