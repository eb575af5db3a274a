"""Tests of lookahead_dist.reference.theory: eqs. (13)-(15), the recommended alpha, and Theorem 2 on a test problem."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lookahead_dist.errors import ConfigError
from lookahead_dist.reference import theory as th


def bound14_grid(alphas, gamma, L, sigma2, tau, K, f_gap):
    """Eq. (14) written out again, vectorized over alphas."""
    a = np.asarray(alphas)
    return 2 * f_gap / (a * gamma * K) + a * gamma * L * sigma2 + (1 - a) ** 2 * gamma**2 * L**2 * sigma2 * (tau - 1)


def cond13_grid(alphas, gamma, L, tau):
    a = np.asarray(alphas)
    return a * gamma * L + (1 - a) ** 2 * gamma**2 * L**2 * tau * (tau - 1)


# ------------------------------------------------------------------ eq. (13)
def test_step_size_condition_hand_values():
    # 0.5*0.05*5 + 0.25*0.0025*25*5*4 = 0.125 + 0.3125
    assert th.step_size_condition(0.5, 0.05, 5.0, 5) == pytest.approx(0.4375, rel=1e-15)
    assert th.step_size_condition(0.3, 0.1, 2.0, 1) == pytest.approx(0.06, rel=1e-15)  # tau=1: alpha gamma L
    assert th.step_size_condition(1.0, 0.1, 2.0, 9) == pytest.approx(0.2, rel=1e-15)  # alpha=1: gamma L
    assert th.satisfies_step_size_condition(1.0, 0.2, 5.0, 3)  # exactly 1
    assert not th.satisfies_step_size_condition(1.0, 0.2000001, 5.0, 3)
    assert not th.satisfies_step_size_condition(0.2, 0.05, 5.0, 10)  # 0.05 + 0.64*0.0625*90 = 3.65


def test_max_gamma_hand_values():
    assert th.max_gamma(1.0, 4.0, 7) == pytest.approx(0.25, rel=1e-15)
    assert th.max_gamma(0.5, 3.0, 1) == pytest.approx(2 / 3, rel=1e-15)
    # alpha=0.5, L=1, tau=2: 0.5 g^2 + 0.5 g - 1 = 0 -> g = 1
    assert th.max_gamma(0.5, 1.0, 2) == pytest.approx(1.0, rel=1e-15)


@pytest.mark.parametrize("alpha", [0.05, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("L", [0.1, 1.0, 37.0])
@pytest.mark.parametrize("tau", [1, 2, 5, 100])
def test_max_gamma_is_equality_in_13(alpha, L, tau):
    g = th.max_gamma(alpha, L, tau)
    assert th.step_size_condition(alpha, g, L, tau) == pytest.approx(1.0, rel=1e-12)
    assert th.satisfies_step_size_condition(alpha, g, L, tau)
    assert not th.satisfies_step_size_condition(alpha, g * (1 + 1e-9), L, tau)


@pytest.mark.parametrize(
    "gamma,L,tau", [(0.05, 5.0, 5), (0.1, 5.0, 10), (0.3, 5.0, 1), (0.02, 5.0, 10), (0.35, 3.0, 2), (1.0, 0.9, 3)]
)
def test_feasible_alpha_interval_matches_grid(gamma, L, tau):
    lo, hi = th.feasible_alpha_interval(gamma, L, tau)
    assert 0 <= lo <= hi <= 1
    grid = np.linspace(1e-9, 1, 100001)
    ok = grid[cond13_grid(grid, gamma, L, tau) <= 1]
    assert abs(ok.min() - max(lo, 1e-9)) <= 2e-5 and abs(ok.max() - hi) <= 2e-5
    assert th.satisfies_step_size_condition(hi, gamma, L, tau)
    if lo > 0:
        assert th.satisfies_step_size_condition(lo, gamma, L, tau)


# ------------------------------------------------------- eqs. (14), (15), floor
def test_bound_hand_values():
    # 2*2/(0.5*0.05*1000) + 0.5*0.05*5*1 + 0.25*0.0025*25*1*4 = 0.16 + 0.125 + 0.0625
    assert th.bound(0.5, 0.05, 5.0, 1.0, 5, 1000, 2.0) == pytest.approx(0.3475, rel=1e-14)
    # (2*1 + 0.25*2*1) / (0.5*10) + 0.25*4*1*1/100 = 0.5 + 0.01
    assert th.bound_sqrt_k(0.5, 2.0, 1.0, 2, 100, 1.0) == pytest.approx(0.51, rel=1e-14)
    assert th.bound_sqrt_k(0.5, 2.0, 1.0, 2, 100, 1.0) == pytest.approx(
        th.bound(0.5, 0.1, 2.0, 1.0, 2, 100, 1.0), rel=1e-14
    )
    # 0.5*0.1*2*1 + 0.25*0.01*4*1*2 = 0.1 + 0.02
    assert th.floor(0.5, 0.1, 2.0, 1.0, 3) == pytest.approx(0.12, rel=1e-14)
    assert th.sgd_floor(0.1, 2.0, 3.0) == pytest.approx(0.6, rel=1e-15)
    assert th.bound(0.7, 0.02, 3.0, 2.0, 4, 400, 0.0) == pytest.approx(th.floor(0.7, 0.02, 3.0, 2.0, 4))


def test_bound_tends_to_floor_and_needs_13():
    b = th.bound(0.4, 0.03, 5.0, 2.0, 6, 6 * 10**9, 10.0)
    assert b - th.floor(0.4, 0.03, 5.0, 2.0, 6) == pytest.approx(20 / (0.4 * 0.03 * 6e9), rel=1e-6)
    with pytest.raises(ConfigError, match=r"\(13\).*alpha=0\.2.*gamma=0\.05.*tau=10"):
        th.bound(0.2, 0.05, 5.0, 1.0, 10, 100, 1.0)
    assert th.bound(0.2, 0.05, 5.0, 1.0, 10, 100, 1.0, strict=False) == pytest.approx(
        bound14_grid(0.2, 0.05, 5.0, 1.0, 10, 100, 1.0)
    )
    with pytest.raises(ConfigError, match=r"\(13\)"):
        th.bound_sqrt_k(0.5, 100.0, 1.0, 2, 4, 1.0)  # gamma = 1/2, gamma L = 50


def test_beats_sgd_floor():
    assert th.beats_sgd_floor(0.5, 0.1, 2.0, 11)  # 0.5*0.2*10 = 1
    assert not th.beats_sgd_floor(0.4, 0.1, 2.0, 11)  # 1.2
    assert th.beats_sgd_floor(0.01, 0.1, 2.0, 1)  # tau = 1 never syncs apart
    for alpha in np.linspace(0.013, 0.987, 37):
        for gamma in (0.01, 0.07, 0.3):
            for tau in (2, 5, 17):
                lookahead, sgd = th.floor(alpha, gamma, 3.0, 2.0, tau), th.sgd_floor(gamma, 3.0, 2.0)
                if abs(lookahead - sgd) > 1e-12 * sgd:
                    assert th.beats_sgd_floor(alpha, gamma, 3.0, tau) == (lookahead < sgd)


# ---------------------------------------------------------- recommended alpha
CASES = [  # gamma, L, sigma2, tau, K, f_gap
    (0.05, 5.0, 1.0, 5, 1000, 45.0),  # upper end alpha = 1
    (0.1, 5.0, 10.0, 10, 1000, 45.0),  # interval [0.84, 1], interior minimizer
    (0.02, 5.0, 100.0, 10, 10000, 45.0),  # interior, lower end open at 0
    (0.1, 5.0, 100.0, 10, 100000, 1.0),
    (0.3, 5.0, 1.0, 1, 1000, 1.0),  # tau = 1, interval (0, 2/3]
    (0.35, 3.0, 4.0, 2, 300, 0.5),  # gamma L > 1: alpha = 1 infeasible
    (0.1, 5.0, 100.0, 10, 10**9, 1.0),  # lower end of (13) is active
    (0.001, 1.0, 1.0, 2, 2, 1e6),
    (0.04, 2.0, 0.0, 4, 400, 3.0),  # sigma2 = 0: largest feasible alpha
]


@pytest.mark.parametrize("gamma,L,sigma2,tau,K,f_gap", CASES)
def test_recommended_alpha_matches_dense_grid(gamma, L, sigma2, tau, K, f_gap):
    alpha = th.recommended_alpha(gamma, L, sigma2, tau, K, f_gap)
    assert 0 < alpha <= 1
    assert th.satisfies_step_size_condition(alpha, gamma, L, tau)
    grid = np.linspace(1e-6, 1, 200001)
    grid = grid[cond13_grid(grid, gamma, L, tau) <= 1]
    values = bound14_grid(grid, gamma, L, sigma2, tau, K, f_gap)
    best = values.min()
    assert th.bound(alpha, gamma, L, sigma2, tau, K, f_gap) <= best * (1 + 1e-12)
    assert abs(alpha - grid[values.argmin()]) <= 1e-4


@settings(max_examples=60, deadline=None)
@given(
    gamma=st.floats(1e-4, 2.0),
    L=st.floats(0.1, 20.0),
    sigma2=st.floats(0.0, 100.0),
    tau=st.integers(1, 30),
    T=st.integers(1, 10**5),
    f_gap=st.floats(1e-3, 1e3),
)
def test_recommended_alpha_is_feasible_and_optimal(gamma, L, sigma2, tau, T, f_gap):
    K = T * tau
    try:
        lo, hi = th.feasible_alpha_interval(gamma, L, tau)
    except ConfigError:
        with pytest.raises(ConfigError, match="no alpha"):
            th.recommended_alpha(gamma, L, sigma2, tau, K, f_gap)
        return
    alpha = th.recommended_alpha(gamma, L, sigma2, tau, K, f_gap)
    assert max(lo, 0) <= alpha <= hi and alpha > 0
    assert th.satisfies_step_size_condition(alpha, gamma, L, tau)
    grid = np.linspace(max(lo, 1e-9), hi, 2001)
    assert th.bound(alpha, gamma, L, sigma2, tau, K, f_gap) <= bound14_grid(
        grid, gamma, L, sigma2, tau, K, f_gap
    ).min() * (1 + 1e-12)


def test_recommended_alpha_differs_from_floor_minimizer():
    gamma, L, sigma2, tau = 0.02, 5.0, 10.0, 5
    floor_argmin = 1 - 1 / (2 * gamma * L * (tau - 1))  # 1 - 1/0.8 = -0.25
    assert floor_argmin <= 0
    alpha = th.recommended_alpha(gamma, L, sigma2, tau, 5000, 10.0)
    assert 0 < alpha <= 1 and alpha != floor_argmin
    # with a positive floor minimizer, the K -> infinity recommendation tends to it
    gamma, tau = 0.02, 10
    floor_argmin = 1 - 1 / (2 * gamma * L * (tau - 1))  # 0.444...
    assert th.recommended_alpha(gamma, L, sigma2, tau, 10**13, 1.0) == pytest.approx(floor_argmin, abs=1e-4)
    # with f_gap = 0 and a non-positive floor minimizer there is no minimizer in (0, 1]
    with pytest.raises(ConfigError, match=r"no minimizer.*f_gap=0"):
        th.recommended_alpha(0.02, L, sigma2, 5, 5000, 0.0)


# ------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "call,pattern",
    [
        (lambda: th.step_size_condition(0.0, 0.1, 1.0, 2), r"alpha must lie in \(0, 1\], got 0\.0"),
        (lambda: th.step_size_condition(1.5, 0.1, 1.0, 2), r"alpha must lie in \(0, 1\], got 1\.5"),
        (lambda: th.step_size_condition(True, 0.1, 1.0, 2), r"alpha must lie in .*got True"),
        (lambda: th.step_size_condition(0.5, -0.1, 1.0, 2), r"gamma must be .*gamma > 0, got -0\.1"),
        (lambda: th.step_size_condition(0.5, float("nan"), 1.0, 2), r"gamma must be .*got nan"),
        (lambda: th.max_gamma(0.5, 0.0, 2), r"L must be .*L > 0, got 0\.0"),
        (lambda: th.max_gamma(0.5, 1.0, 0), r"tau must be an integer >= 1, got 0"),
        (lambda: th.max_gamma(0.5, 1.0, 2.5), r"tau must be an integer .*got 2\.5"),
        (lambda: th.floor(0.5, 0.1, 1.0, -1.0, 2), r"sigma2 must be .*sigma2 >= 0, got -1\.0"),
        (lambda: th.bound(0.5, 0.1, 1.0, 1.0, 2, 7, 1.0), r"K must be an integer multiple of tau=2.*got 7"),
        (lambda: th.bound(0.5, 0.1, 1.0, 1.0, 4, 2, 1.0), r"K must be .*K >= tau.*got 2"),
        (lambda: th.bound_sqrt_k(0.5, 1.0, 1.0, 2, 4, -2.0), r"f_gap must be .*f_gap >= 0, got -2\.0"),
        (
            lambda: th.recommended_alpha(1.0, 5.0, 1.0, 3, 30, 1.0),
            r"no alpha in \(0, 1\] satisfies .*\(13\).*gamma=1\.0, L=5\.0, tau=3",
        ),
        (lambda: th.RippledQuadratic(d=0), r"d must be an integer >= 1, got 0"),
        (lambda: th.empirical_gradient_norm(0.5, 2, 0.1, 10, [], sigma2=1.0), r"seeds must be"),
    ],
)
def test_errors_name_argument_rule_and_value(call, pattern):
    with pytest.raises(ConfigError, match=pattern):
        call()
    assert issubclass(ConfigError, ValueError)


# ------------------------------------------------------------- test problem
def test_problem_constants_and_autograd_gradient():
    p = th.RippledQuadratic(d=7, a=1.0, b=1.5, w=2.0)
    assert p.L == 7.0 and p.min_curvature == -5.0 and p.f_inf == -10.5
    x = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(p.value(x).sum(), x)
    assert torch.allclose(p.grad(x.detach()), g, rtol=1e-14, atol=1e-14)
    assert np.allclose(p.grad(x.detach().numpy()), g.numpy(), rtol=1e-14, atol=1e-14)
    assert float(p.value(np.zeros(7))) == p.f_inf
    pts = np.random.default_rng(1).normal(scale=4.0, size=(10000, 7))
    assert (p.value(pts) >= p.f_inf).all()


def test_problem_hessian_bounded_by_L_and_indefinite():
    p = th.RippledQuadratic()
    gen = torch.Generator().manual_seed(2)
    x = (torch.rand(400, p.d, dtype=torch.float64, generator=gen) - 0.5) * 8
    v = torch.randn(400, p.d, dtype=torch.float64, generator=gen)
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(p.value(x).sum(), x, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), x)
    curv = (v * hv).sum(-1) / (v * v).sum(-1)
    assert torch.allclose(hv, p.hessian_diag(x.detach()) * v, rtol=1e-12, atol=1e-12)
    assert curv.max() <= p.L and curv.min() >= p.min_curvature
    assert curv.min() < 0  # not convex
    # along coordinate directions at x_i = pi / w the curvature is a - b w^2 < 0
    e = np.zeros(p.d)
    e[0] = math.pi / p.w
    assert p.hessian_diag(e)[0] == pytest.approx(p.min_curvature)
    # gradient Lipschitz on random pairs
    xs, ys = np.random.default_rng(3).normal(scale=3.0, size=(2, 2000, p.d))
    ratio = np.linalg.norm(p.grad(xs) - p.grad(ys), axis=-1) / np.linalg.norm(xs - ys, axis=-1)
    assert ratio.max() <= p.L


# -------------------------------------------------------------- trajectories
def test_trace_matches_hand_written_lookahead_without_noise():
    p = th.RippledQuadratic(d=3)
    alpha, tau, gamma, T = 0.4, 3, 0.07, 5
    x0 = np.array([2.0, -1.0, 0.5])
    expected = []
    z = x0.copy()
    for _ in range(T):  # Algorithm 1: inner loop from the slow model, then z += alpha (x - z)
        x = z.copy()
        for _ in range(tau):
            y = alpha * x + (1 - alpha) * z
            expected.append(np.sum(p.grad(y) ** 2))
            x = x - gamma * p.grad(x)
        z = z + alpha * (x - z)
    got = th.gradient_norm_trace(alpha, tau, gamma, T * tau, [0, 1], sigma2=0.0, problem=p, x0=x0)
    assert got.shape == (T * tau, 2)
    np.testing.assert_allclose(got[:, 0], expected, rtol=1e-12)
    np.testing.assert_allclose(got[:, 1], expected, rtol=1e-12)


def test_degenerate_cases_are_sgd_and_seeds_are_independent():
    kw = dict(sigma2=5.0)
    sgd = th.gradient_norm_trace(1.0, 1, 0.05, 300, [4, 9], **kw)
    # alpha = 1: the slow model copies the fast one, plain SGD with rate gamma
    np.testing.assert_allclose(th.gradient_norm_trace(1.0, 7, 0.05, 300, [4, 9], **kw), sgd, rtol=1e-10)
    # tau = 1: mixing every step, plain SGD with rate alpha gamma (eq. 8 with x_k = y_k)
    np.testing.assert_allclose(th.gradient_norm_trace(0.5, 1, 0.1, 300, [4, 9], **kw), sgd, rtol=1e-10)
    batch = th.empirical_gradient_norm(0.3, 4, 0.05, 400, [1, 4, 2, 9], **kw)
    alone = th.empirical_gradient_norm(0.3, 4, 0.05, 400, [9, 4], **kw)
    np.testing.assert_array_equal(batch[[3, 1]], alone)
    assert batch[0] != batch[1]


def test_noise_has_total_variance_sigma2():
    # quadratic (b = 0), alpha = 1, started at the minimum: stationary SGD on a x^2/2 with
    # rate g has E||grad f||^2 = a g sigma2 / (2 - a g) (per-coordinate variance sigma2 / d)
    p = th.RippledQuadratic(d=10, a=1.0, b=0.0)
    got = th.empirical_gradient_norm(1.0, 1, 0.1, 4000, range(20), sigma2=10.0, problem=p, x0=np.zeros(10)).mean()
    assert got == pytest.approx(0.1 * 10.0 / 1.9, rel=0.03)


# ----------------------------------------------------------------- Theorem 2
@pytest.mark.parametrize("tau", [2, 8])
@pytest.mark.parametrize("gamma", [0.01, 0.03])
def test_theorem2_holds_on_rippled_quadratic(tau, gamma):
    p = th.RippledQuadratic()
    sigma2, K, seeds = 20.0, 4000, range(20)
    f_gap = float(p.value(p.default_start())) - p.f_inf
    for alpha in (0.3, 0.6, 1.0):
        assert th.satisfies_step_size_condition(alpha, gamma, p.L, tau)
        empirical = th.empirical_gradient_norm(alpha, tau, gamma, K, seeds, sigma2=sigma2).mean()
        b = th.bound(alpha, gamma, p.L, sigma2, tau, K, f_gap)
        assert empirical <= b, (alpha, tau, gamma, empirical, b)
        assert empirical >= 0.1 * b  # the check is not vacuous on this problem
