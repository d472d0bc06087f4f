import itertools
import math

import numpy as np
import pytest
import torch

from conftest import matrix_with_spectrum
from muonkit import coefficients as C
from muonkit import orthogonalize
from muonkit import theory as T
from muonkit.cli import main
from muonkit.design import compose
from muonkit.theory import experiments as E


def test_taylor_presets_and_p_kappa():
    assert C.get("taylor_3").rows == ((1.5, -0.5),)
    assert C.get("taylor_5").rows == ((1.875, -1.25, 0.375),)
    for kappa in range(1, 6):
        p = C.get(f"taylor_{2 * kappa + 1}")
        assert p.degree == 2 * kappa + 1
        # p_kappa(lambda) ~ lambda^(-1/2) near 1 to order kappa
        lam = 1 - 1e-2
        assert abs(T.p_kappa(kappa, lam) - lam**-0.5) < 1e-2 ** (kappa + 1)
        # sigma -> sigma p(sigma^2) fixes 1
        assert math.isclose(sum(p.rows[0]), 1.0, abs_tol=1e-12)


def test_residual_map_closed_forms():
    u = np.linspace(0, 1, 101)
    assert np.allclose(T.residual_map(1, u), u**2 * (3 + u) / 4, atol=1e-15)
    assert np.allclose(T.residual_map(2, u), u**3 * (40 + 15 * u + 9 * u**2) / 64, atol=1e-15)


@pytest.mark.parametrize("kappa", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("l", [1e-3, 0.05, 0.3, 0.8])
def test_iterates_never_exceed_theorem_2(kappa, l):
    deltas = T.residual_iterates(kappa, 8, l)
    for q in range(9):
        assert deltas[q] <= T.residual_bound(kappa, q, l) + 1e-15
    assert np.all(np.diff(deltas) <= 1e-15)


def _decimal_iterates(kappa, q, l, digits=700):
    """delta_0 .. delta_q by the printed phi(u) = 1 - (1 - u) p_kappa(1 - u)^2 in 700-digit decimals (from the
    float l exactly): the cancellation costs at most ~310 digits above 1e-310, leaving hundreds."""
    import decimal
    from math import comb

    with decimal.localcontext() as ctx:
        ctx.prec, ctx.Emin = digits, -(10**6)
        one = decimal.Decimal(1)
        c = [decimal.Decimal(comb(2 * s, s)) / decimal.Decimal(4**s) for s in range(kappa + 1)]
        u = one - decimal.Decimal(l) ** 2
        out = [u]
        for _ in range(q):
            if u < decimal.Decimal("1e-400"):  # far below what the test reads
                break
            P = sum((cs * u**s for s, cs in enumerate(c)), decimal.Decimal(0))
            u = one - (one - u) * P * P
            out.append(u)
    return out


@pytest.mark.parametrize("kappa", [1, 2, 3, 5])
@pytest.mark.parametrize("l", [0.1, 0.5, 0.9])
def test_residuals_epsilon_and_chi_keep_relative_precision_down_to_1e_300(kappa, l):
    """delta_q, epsilon_q and chi_q - 1 agree with 700-digit arithmetic to 1e-3 relative wherever delta_q >= 1e-300
    (the printed phi(u) in float64 stopped near 2e-16, or went negative: kappa = 5, l = 0.5, q >= 3)."""
    q_max = 20
    exact = _decimal_iterates(kappa, q_max, l)
    got = T.residual_iterates(kappa, q_max, l)
    checked = 0
    for q in range(len(exact)):
        if exact[q] < 1e-300:
            break
        want = float(exact[q])
        assert got[q] == pytest.approx(want, rel=1e-3, abs=0), q
        eps = T.taylor_epsilon(kappa, q, l)
        want_eps = want / (1 + math.sqrt(1 - want))
        assert eps["epsilon"] == pytest.approx(want_eps, rel=1e-3, abs=0)
        assert eps["chi_excess"] == pytest.approx(want_eps / (1 - want_eps), rel=1e-3, abs=0)
        checked += 1
    assert checked >= 3 and exact[checked - 1] < 1e-50  # residuals far below float64 rounding were reached


def test_residual_factor_is_exact_and_positive():
    from fractions import Fraction

    assert T.residual_factor(1) == (Fraction(3, 4), Fraction(1, 4))
    assert T.residual_factor(2) == (Fraction(40, 64), Fraction(15, 64), Fraction(9, 64))
    for kappa in range(1, 9):
        assert all(a > 0 for a in T.residual_factor(kappa))
        assert sum(T.residual_factor(kappa)) == 1  # phi(1) = 1: a zero singular value stays at zero


def test_matrix_delta_uses_the_projector_onto_the_momentums_range():
    """A rank-deficient momentum: NS leaves its null directions at 0, so ||I - X X^T|| = 1 however many steps,
    while the paper's residual ||P - X X^T|| follows the scalar map on the nonzero singular values."""
    kappa, q, l = 2, 3, 0.3
    sig = np.array([1.0, 0.7, 0.5, l, 0.0, 0.0])
    M = matrix_with_spectrum(10, 6, sig).numpy().T.copy()  # 6 x 10 of rank 4
    rows = [C.taylor_row(kappa)] * q
    Y = torch.from_numpy(M / np.linalg.norm(M, ord=2))
    for row in rows:  # X <- X p_kappa(X^T X), the paper's step, without renormalising
        A = Y @ Y.mT
        Y = sum(c * torch.linalg.matrix_power(A, i) for i, c in enumerate(row)) @ Y
    Xn = Y.numpy()
    want = max(T.residual_iterates(kappa, q, s)[-1] for s in sig[sig > 0])
    assert T.matrix_delta(Xn, M) == pytest.approx(want, rel=1e-9)
    assert np.linalg.norm(np.eye(6) - Xn @ Xn.T, ord=2) == pytest.approx(1.0)


def _deterministic_svd_muon(m, n, s, T_steps):
    """Kim & Oh's algorithm without noise (sigma = 0, so Theorem 1's beta is clipped to 0) on
    f = ||W - W*||_F^2 / 2 with W* of equal singular values s: L = r, D = r s^2 / 2. Returns (mean nuclear norm
    of the gradient over W_0 .. W_{T-1}, L, D)."""
    r = min(m, n)
    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    W_star = s * U @ V.T
    L, D = float(r), r * s * s / 2
    eta, beta = T.muon_hyperparameters(L, D, 0.0, 1, r, T_steps)
    assert beta == 0.0
    W, M, total = torch.zeros(m, n, dtype=torch.float64), torch.zeros(m, n, dtype=torch.float64), 0.0
    for _ in range(T_steps):
        G = W - W_star
        total += float(torch.linalg.svdvals(G).sum())
        M = beta * M + G
        W = W - eta * orthogonalize(M, method="svd")
    return total / T_steps, L, D


def test_theorem_1_bound_holds_where_beta_is_clipped_and_eq8_as_printed_does_not():
    measured, L, D = _deterministic_svd_muon(8, 32, 1.0, 400)
    assert measured == pytest.approx(0.4242, abs=1e-4)
    bound = T.muon_bound(L, D, 0.0, 1, 8, 400).total
    assert measured <= bound == pytest.approx(1.5 * math.sqrt(L * D / 400))
    assert T.eq8_as_printed(L, D, 0.0, 1, 8, 400) < measured  # the printed form is no bound here


@pytest.mark.parametrize("m, n, s, steps", [(4, 16, 0.5, 50), (8, 8, 2.0, 200), (16, 4, 1.0, 30), (6, 12, 3.0, 1000)])
def test_theorem_1_bound_holds_on_deterministic_problems(m, n, s, steps):
    """The bound holds, and is met with equality up to rounding where 1/eta steps land on the optimum (equal
    singular values): so the check allows 1e-12 relative; eq. (8) as printed is a third of it."""
    measured, L, D = _deterministic_svd_muon(m, n, s, steps)
    bound = T.muon_bound(L, D, 0.0, 1, min(m, n), steps).total
    assert measured <= bound * (1 + 1e-12)
    assert T.eq8_as_printed(L, D, 0.0, 1, min(m, n), steps) < 0.9 * measured


def test_bound_equals_eq8_where_beta_is_not_clipped():
    for args in [(1, 1, 1, 1, 64, 1000), (2, 3, 0.5, 4, 16, 100), (0.5, 10, 2, 8, 32, 5000)]:
        for eps in (0.0, 0.3):
            assert T.muon_hyperparameters(*args)[1] > 0
            assert T.muon_bound(*args, eps=eps).total == pytest.approx(T.eq8_as_printed(*args, eps=eps), rel=1e-12)


def test_chi_goes_to_one_doubly_exponentially_and_with_degree():
    chis = [T.taylor_epsilon(2, q, 0.3)["chi"] - 1 for q in range(1, 6)]
    # doubly exponential: log(chi - 1) falls by a growing amount each step
    logs = np.log([c for c in chis if c > 1e-15])
    assert np.all(np.diff(np.diff(logs)) < 0)
    for q in (1, 2, 3):
        by_degree = [T.taylor_epsilon(k, q, 0.3)["epsilon"] for k in (1, 2, 3, 4, 5)]
        assert np.all(np.diff(by_degree) < 0)


@pytest.mark.parametrize("name, steps", [("taylor_5", 3), ("jordan", 5), ("polar_express", 5), ("you", 5)])
def test_matrix_epsilon_matches_scalar(name, steps):
    p = C.get(name)
    l = 0.05
    sig = np.geomspace(l, 1.0, 24)
    G = matrix_with_spectrum(40, 24, sig)  # float64
    X = orthogonalize(G, p, steps, dtype=torch.float64, eps=0.0)
    measured = float(torch.linalg.matrix_norm(X - orthogonalize(G, method="svd"), ord=2))
    x = sig / (p.norm_scale * np.linalg.norm(sig))  # the spectrum the polynomials see after normalisation
    # ||X - U V^T||_op is exactly the worst |1 - phi| over the matrix's own singular values ...
    assert math.isclose(measured, float(np.max(np.abs(1 - compose(p.schedule(steps), x)))), rel_tol=1e-6)
    # ... and at most the scalar epsilon over the whole interval they lie in
    assert measured <= T.schedule_epsilon(p.schedule(steps), x.min(), n=200001)["epsilon"] * (1 + 1e-9)
    if x.max() < 1:  # and over [l, 1] as a whole when the range is extended to 1
        assert measured <= T.schedule_epsilon(p.schedule(steps), x.min())["epsilon"] + 1e-9


def test_schedule_epsilon_says_which_do_not_converge():
    assert not T.schedule_epsilon(C.get("jordan").schedule(20), 0.1)["converges_to_1"]
    assert T.schedule_epsilon(C.get("jordan").schedule(20), 0.1)["chi"] > 1.4
    assert T.schedule_epsilon(C.get("taylor_5").schedule(6), 0.1)["converges_to_1"]
    assert T.schedule_epsilon(C.get("polar_express").schedule(8), 1e-3)["chi"] < 1 + 1e-9


def test_bounds_shapes():
    b0 = T.muon_bound(2.0, 3.0, 1.5, 4, 32, 1000, eps=0.0)
    b1 = T.muon_bound(2.0, 3.0, 1.5, 4, 32, 1000, eps=0.2)
    assert b1.total > b0.total and T.muon_bound(1, 1, 1, 1, 4, 10, eps=1.0).total == math.inf
    for r in (4, 16, 64):
        gap = T.rank_gap(1.0, 1.0, 1.0, 1, r, 1000)
        assert math.isclose(gap["deterministic_ratio"], math.sqrt(r)) and math.isclose(gap["noise_ratio"], r**0.25)
    eta, beta = T.muon_hyperparameters(1.0, 1.0, 0.0, 1, 8, 100)
    assert beta == 0.0 and math.isclose(eta, 0.1)
    with pytest.raises(ValueError):
        T.muon_bound(-1, 1, 1, 1, 1, 1)


def test_constant_experiment_small(tmp_path):
    res, table, files = E.run("constant", str(tmp_path), ls=(0.1,), kappas=(1, 2), qs=(1, 2, 3, 4, 5, 6))
    assert "kappa=2" in table and all(p.endswith((".json", ".png")) for p in files)
    jordan = [t["chi"] for t in res["presets"] if t["name"] == "jordan"]
    pe = [t["chi"] for t in res["presets"] if t["name"] == "polar_express"]
    k2 = [t["chi"] for t in res["taylor"] if t["kappa"] == 2]
    assert jordan[-1] > 1.4 and pe[-1] < 1.01 and k2[-1] < 1.01  # jordan stalls; the convergent ones reach 1
    assert all(a >= b for a, b in itertools.pairwise(k2))


def test_rank_experiment_small_shows_sgd_growing_faster(tmp_path):
    res, _, _ = E.run("rank", str(tmp_path), ranks=(2, 8, 32), steps=100, seeds=(0,))
    assert res["slopes"]["sgd_m"] > res["slopes"]["svd_muon"]
    assert res["slopes"]["sgd_m"] > res["slopes"]["ns_muon"]


def test_bound_experiment_small_holds(tmp_path):
    res, table, _ = E.run("bound", str(tmp_path), T=150, seeds=(0,))
    for method in ("svd_muon", "ns_muon"):
        run = res["runs"][method]
        assert run["measured"] <= run["bound"]["total"]
    assert res["runs"]["ns_muon"]["eps_measured_max"] < 1
    assert "holds: True" in table


def test_theory_cli(capsys):
    assert main(["theory", "constant", "--kappa", "2", "--q", "3", "--l", "0.1"]) == 0
    assert "chi_q" in capsys.readouterr().out
    assert main(["theory", "epsilon", "jordan", "--l", "0.01"]) == 0
    assert "does not drive singular values to 1" in capsys.readouterr().out
    assert main(["theory", "epsilon", "nope"]) == 2
    assert "unknown coefficient preset" in capsys.readouterr().err


def test_achieved_epsilon_on_a_training_run_stays_within_the_scalar_maps(tmp_path):
    """While the tiny GPT trains, what NS makes of each singular direction with normalised value >= l is within
    the scalar map's epsilon on [l, 1] (float32 NS against the float64 map), and the spectra spread below l."""
    res = E.achieved(presets=("jordan", "taylor_5"), steps=12, every=6)
    for name, e in res["presets"].items():
        for c in map(str, res["cuts"]):
            assert 0 < e["epsilon_max"][c] <= e["predicted"][c] + 1e-4, (name, c)
        assert e["fraction_below_median"]["0.001"] > 0  # LayerNorm's null direction at least
    jordan, taylor = res["presets"]["jordan"], res["presets"]["taylor_5"]
    assert taylor["epsilon_max"]["0.1"] < 0.01 < jordan["epsilon_max"]["0.1"]  # Jordan's quintic never reaches 1
