"""Lookahead's convergence theory (Wang, Tantia, Ballas, Rabbat) as functions.

Setting shared by every function here (paper Section 3):

- f: R^d -> R has an L-Lipschitz gradient, ||grad f(x) - grad f(y)|| <= L ||x - y||
  (eq. 11; the paper writes f but means its gradient), and is bounded below by f_inf.
- Stochastic gradients are unbiased, E g(x; xi) = grad f(x) (eq. 2), with total
  variance E ||g(x; xi) - grad f(x)||^2 <= sigma^2, summed over all d coordinates (eq. 3).
- The base (fast) optimizer is plain SGD with learning rate gamma, constant within
  each inner loop of tau steps; every tau steps the slow model takes
  z <- z + alpha (x - z) and the fast model restarts from it (eqs. 4-5).
- y_0 = x_0 = z_0, and a run is K = T * tau steps: T whole outer loops.

The analysis follows y_k = alpha x_k + (1 - alpha) z_k, which obeys
y_{k+1} = y_k - alpha gamma g(x_k; xi_k) (eq. 8).

Example::

    >>> from lookahead_dist.reference import theory
    >>> theory.satisfies_step_size_condition(alpha=0.5, gamma=0.05, L=5.0, tau=5)
    True
    >>> round(theory.bound(0.5, 0.05, 5.0, 1.0, 5, 1000, f_gap=2.0), 6)
    0.3475
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

from lookahead_dist.errors import ConfigError
from lookahead_dist.validation import check_int, check_lookahead_alpha, check_real, check_tau

__all__ = [
    "step_size_condition",
    "satisfies_step_size_condition",
    "max_gamma",
    "feasible_alpha_interval",
    "bound",
    "bound_sqrt_k",
    "floor",
    "sgd_floor",
    "beats_sgd_floor",
    "recommended_alpha",
    "RippledQuadratic",
    "gradient_norm_trace",
    "empirical_gradient_norm",
]


# --------------------------------------------------------------------- checks
def _real(name: str, value, rule: str, ok) -> float:
    return check_real(value, name, f"be {rule}", ok)


def _alpha(alpha) -> float:
    return check_lookahead_alpha(alpha)


def _pos(name: str, value) -> float:
    return _real(name, value, f"a finite real number with {name} > 0", lambda v: v > 0.0)


def _nonneg(name: str, value) -> float:
    return _real(name, value, f"a finite real number with {name} >= 0", lambda v: v >= 0.0)


def _tau(tau) -> int:
    return check_tau(tau)


def _steps(K, tau: int) -> int:
    rule = f"an integer multiple of tau={tau} with K >= tau (whole outer loops)"
    if isinstance(K, bool) or not isinstance(K, numbers.Integral) or not (K >= tau and K % tau == 0):
        raise ConfigError(f"K must be {rule}, got {K!r}")
    return int(K)


def _require_13(alpha: float, gamma: float, L: float, tau: int) -> None:
    value = step_size_condition(alpha, gamma, L, tau)
    if not value <= 1.0:
        raise ConfigError(
            f"step-size condition (13) fails: alpha*gamma*L + (1-alpha)^2*gamma^2*L^2*tau*(tau-1)"
            f" = {value!r} > 1 for alpha={alpha!r}, gamma={gamma!r}, L={L!r}, tau={tau!r};"
            f" the bound does not hold (pass strict=False for the bare expression)"
        )


# -------------------------------------------------------- step-size condition
def step_size_condition(alpha, gamma, L, tau) -> float:
    """Left side of eq. (13): alpha gamma L + (1 - alpha)^2 gamma^2 L^2 tau (tau - 1).

    Theorems 1 and 2 need it to be <= 1.  For tau = 1 (mixing every step) it is
    alpha gamma L, the usual SGD condition on the effective rate alpha gamma.
    """
    alpha, gamma, L, tau = _alpha(alpha), _pos("gamma", gamma), _pos("L", L), _tau(tau)
    return alpha * gamma * L + (1.0 - alpha) ** 2 * gamma**2 * L**2 * tau * (tau - 1)


def satisfies_step_size_condition(alpha, gamma, L, tau) -> bool:
    """True iff eq. (13) holds: ``step_size_condition(alpha, gamma, L, tau) <= 1``."""
    return step_size_condition(alpha, gamma, L, tau) <= 1.0


def max_gamma(alpha, L, tau) -> float:
    """Largest gamma satisfying eq. (13) for the given alpha, L, tau.

    (13) reads E gamma^2 + b gamma - 1 <= 0 with E = (1-alpha)^2 L^2 tau (tau-1) >= 0
    and b = alpha L > 0, so the feasible set is (0, gamma*] with the positive root

        gamma* = 2 / (b + sqrt(b^2 + 4 E))      (= 1 / (alpha L) when E = 0),

    written in the form that does not cancel.  The result is rounded down, if
    needed, so that it satisfies (13) in floating point; (13) holds with equality
    up to rounding.
    """
    alpha, L, tau = _alpha(alpha), _pos("L", L), _tau(tau)
    E = (1.0 - alpha) ** 2 * L**2 * tau * (tau - 1)
    b = alpha * L
    gamma = 2.0 / (b + math.sqrt(b * b + 4.0 * E))
    while not satisfies_step_size_condition(alpha, gamma, L, tau):
        gamma = math.nextafter(gamma, 0.0)
    return gamma


def feasible_alpha_interval(gamma, L, tau) -> Tuple[float, float]:
    """The alphas in (0, 1] satisfying eq. (13), as an interval (lo, hi).

    With beta = 1 - alpha and D = gamma^2 L^2 tau (tau-1), (13) is the convex
    quadratic D beta^2 - gamma L beta + (gamma L - 1) <= 0, so its solution set is
    an interval.  alpha in (0, 1] satisfies (13) iff lo <= alpha <= hi and
    alpha > 0; lo = 0 means the interval is open at 0.  Raises ConfigError if
    no alpha in (0, 1] satisfies (13).  Endpoints are moved inward by rounding
    so that they satisfy (13) in floating point.
    """
    gamma, L, tau = _pos("gamma", gamma), _pos("L", L), _tau(tau)
    g = gamma * L
    D = g * g * tau * (tau - 1)
    if D == 0.0:  # tau == 1: alpha gamma L <= 1
        lo, hi = 0.0, min(1.0, 1.0 / g)
    else:
        disc = g * g - 4.0 * D * (g - 1.0)
        if disc < 0.0:
            lo, hi = 1.0, 0.0
        else:
            q = 0.5 * (g + math.sqrt(disc))  # beta roots: q / D and (g - 1) / q
            b_small, b_big = (g - 1.0) / q, q / D
            lo, hi = max(0.0, 1.0 - b_big), min(1.0, 1.0 - b_small)
    if hi <= 0.0 or lo > hi:
        raise ConfigError(
            f"no alpha in (0, 1] satisfies step-size condition (13) for gamma={gamma!r},"
            f" L={L!r}, tau={tau!r}; use gamma <= max_gamma(alpha, L, tau)"
        )
    while hi > lo and not satisfies_step_size_condition(hi, gamma, L, tau):
        hi = math.nextafter(hi, 0.0)
    while lo > 0.0 and lo < hi and not satisfies_step_size_condition(lo, gamma, L, tau):
        lo = math.nextafter(lo, 1.0)
    if not satisfies_step_size_condition(hi, gamma, L, tau):
        raise ConfigError(
            f"no alpha in (0, 1] satisfies step-size condition (13) for gamma={gamma!r},"
            f" L={L!r}, tau={tau!r}; use gamma <= max_gamma(alpha, L, tau)"
        )
    return lo, hi


# --------------------------------------------------------------------- bounds
def bound(alpha, gamma, L, sigma2, tau, K, f_gap, *, strict: bool = True) -> float:
    """Right side of eq. (14), Theorem 2 (fixed learning rate):

        (1/K) sum_{k<K} E ||grad f(y_k)||^2
            <= 2 f_gap / (alpha gamma K) + alpha gamma L sigma^2
               + (1 - alpha)^2 gamma^2 L^2 sigma^2 (tau - 1),

    with f_gap = f(y_0) - f_inf >= 0 and K a multiple of tau.  The bound is proved
    only under (13); with ``strict=True`` (default) a violation raises ConfigError.
    """
    alpha, gamma, L, tau = _alpha(alpha), _pos("gamma", gamma), _pos("L", L), _tau(tau)
    sigma2, f_gap, K = _nonneg("sigma2", sigma2), _nonneg("f_gap", f_gap), _steps(K, tau)
    if strict:
        _require_13(alpha, gamma, L, tau)
    return 2.0 * f_gap / (alpha * gamma * K) + floor(alpha, gamma, L, sigma2, tau)


def bound_sqrt_k(alpha, L, sigma2, tau, K, f_gap, *, strict: bool = True) -> float:
    """Right side of eq. (15): eq. (14) with gamma = 1 / sqrt(K),

        (2 f_gap + alpha^2 L sigma^2) / (alpha sqrt(K)) + (1-alpha)^2 L^2 sigma^2 (tau-1) / K,

    which is O(1 / sqrt(K)) (eq. 16).  With ``strict=True`` (default) raises
    ConfigError unless (13) holds at gamma = 1 / sqrt(K).
    """
    alpha, L, tau = _alpha(alpha), _pos("L", L), _tau(tau)
    sigma2, f_gap, K = _nonneg("sigma2", sigma2), _nonneg("f_gap", f_gap), _steps(K, tau)
    if strict:
        _require_13(alpha, 1.0 / math.sqrt(K), L, tau)
    return (2.0 * f_gap + alpha**2 * L * sigma2) / (alpha * math.sqrt(K)) + (1.0 - alpha) ** 2 * L**2 * sigma2 * (
        tau - 1
    ) / K


def floor(alpha, gamma, L, sigma2, tau) -> float:
    """K -> infinity limit of eq. (14) at fixed gamma (the error floor):

        alpha gamma L sigma^2 + (1 - alpha)^2 gamma^2 L^2 sigma^2 (tau - 1).

    As a function of alpha alone it is minimized at 1 - 1 / (2 gamma L (tau - 1))
    (tau >= 2), which is <= 0 whenever gamma L (tau - 1) <= 1/2; see
    :func:`recommended_alpha` for the minimizer of the whole bound.
    """
    alpha, gamma, L, tau = _alpha(alpha), _pos("gamma", gamma), _pos("L", L), _tau(tau)
    sigma2 = _nonneg("sigma2", sigma2)
    return alpha * gamma * L * sigma2 + (1.0 - alpha) ** 2 * gamma**2 * L**2 * sigma2 * (tau - 1)


def sgd_floor(gamma, L, sigma2) -> float:
    """Error floor of plain SGD with learning rate gamma: gamma L sigma^2 (= floor at alpha = 1)."""
    return _pos("gamma", gamma) * _pos("L", L) * _nonneg("sigma2", sigma2)


def beats_sgd_floor(alpha, gamma, L, tau) -> bool:
    """The paper's test (1 - alpha) gamma L (tau - 1) <= 1 (Section 3.1).

    For sigma^2 > 0 it is equivalent to floor(alpha, ...) <= sgd_floor(gamma, ...):
    dividing alpha + (1-alpha)^2 gamma L (tau-1) <= 1 by 1 - alpha > 0 gives it,
    and alpha = 1 gives equality of the floors.
    """
    alpha, gamma, L, tau = _alpha(alpha), _pos("gamma", gamma), _pos("L", L), _tau(tau)
    return (1.0 - alpha) * gamma * L * (tau - 1) <= 1.0


def recommended_alpha(gamma, L, sigma2, tau, K, f_gap) -> float:
    """The alpha in (0, 1] minimizing the whole bound (14) at this K, subject to (13).

    With A = 2 f_gap / (gamma K), B = gamma L sigma^2, C = gamma^2 L^2 sigma^2 (tau-1),
    bound (14) is phi(alpha) = A / alpha + B alpha + C (1 - alpha)^2, a sum of convex
    functions on alpha > 0.  Its derivative -A / alpha^2 + B - 2 C (1 - alpha) is
    increasing, and alpha^2 phi'(alpha) = 2 C alpha^3 + (B - 2 C) alpha^2 - A is a
    cubic with exactly one positive root when A > 0; that root, clipped to the
    interval of alphas satisfying (13) (:func:`feasible_alpha_interval`), is the
    minimizer.  When phi is constant (f_gap = sigma2 = 0) the largest feasible
    alpha is returned.

    Minimizing the floor alone (A = 0) would give 1 - 1 / (2 gamma L (tau - 1)),
    which is <= 0 whenever gamma L (tau - 1) <= 1/2, so it cannot serve as the
    recommendation; the f_gap term keeps the minimizer positive.  Raises
    ConfigError if no alpha in (0, 1] satisfies (13), or if f_gap = 0 and phi
    decreases all the way to alpha -> 0 (no minimizer in (0, 1]).
    """
    gamma, L, tau = _pos("gamma", gamma), _pos("L", L), _tau(tau)
    sigma2, f_gap, K = _nonneg("sigma2", sigma2), _nonneg("f_gap", f_gap), _steps(K, tau)
    lo, hi = feasible_alpha_interval(gamma, L, tau)
    A = 2.0 * f_gap / (gamma * K)
    B = gamma * L * sigma2
    C = gamma**2 * L**2 * sigma2 * (tau - 1)

    def dphi(a: float) -> float:
        return -A / (a * a) + B - 2.0 * C * (1.0 - a)

    if dphi(hi) <= 0.0:
        return hi
    if lo > 0.0 and dphi(lo) >= 0.0:
        return lo
    if A == 0.0:
        if C > 0.0 and 1.0 - B / (2.0 * C) > lo:
            return 1.0 - B / (2.0 * C)
        raise ConfigError(
            f"bound (14) has no minimizer in (0, 1] for f_gap={f_gap!r}, gamma={gamma!r},"
            f" L={L!r}, sigma2={sigma2!r}, tau={tau!r}: it decreases toward alpha -> 0;"
            f" pass f_gap > 0"
        )
    # the unique positive root lies in (lo, hi): dphi(lo+) < 0 < dphi(hi)
    roots = np.roots([2.0 * C, B - 2.0 * C, 0.0, -A])
    real = [r.real for r in roots if abs(r.imag) <= 1e-9 * max(1.0, abs(r)) and lo < r.real < hi]
    a_lo, a_hi = lo, hi
    a = min(real, key=lambda r: abs(dphi(r))) if real else 0.5 * (lo + hi)
    for _ in range(200):  # safeguarded bisection polish on the increasing dphi
        if not a_lo < a < a_hi:
            a = 0.5 * (a_lo + a_hi)
        d = dphi(a)
        if d == 0.0 or a_hi - a_lo <= 4e-16 * a_hi:
            break
        a_lo, a_hi = (a, a_hi) if d < 0.0 else (a_lo, a)
        a = a - d / (2.0 * A / a**3 + 2.0 * C)  # Newton step; phi'' > 0
    return float(a)


# ------------------------------------------------------------ test problem
@dataclass(frozen=True)
class RippledQuadratic:
    """f(x) = sum_i [ a x_i^2 / 2 - b cos(w x_i) ], a smooth non-convex test function.

    Proof of the constants.  f is separable with Hessian
    diag(a + b w^2 cos(w x_i)), so every Hessian eigenvalue lies in
    [a - b w^2, a + b w^2].  Hence ||grad^2 f(x)|| <= a + b w^2 =: L (a > 0, b >= 0),
    and grad f(x) - grad f(y) = int_0^1 grad^2 f(y + t (x - y)) (x - y) dt gives
    ||grad f(x) - grad f(y)|| <= L ||x - y||, i.e. eq. (11).  When b w^2 > a the
    eigenvalue a - b w^2 < 0 is attained at x_i = pi / w, so f is not convex.
    Since a x^2 / 2 >= 0 and -b cos(w x) >= -b with equality at x = 0 for both,
    f_inf = -b d, attained at x = 0.

    ``value`` and ``grad`` take numpy arrays or torch tensors whose last axis has
    length d and broadcast over the leading axes.
    """

    d: int = 10
    a: float = 1.0
    b: float = 1.0
    w: float = 2.0

    def __post_init__(self):
        check_int(self.d, "d")
        _pos("a", self.a)
        _nonneg("b", self.b)
        _pos("w", self.w)

    @property
    def L(self) -> float:
        """Lipschitz constant of the gradient: a + b w^2."""
        return self.a + self.b * self.w**2

    @property
    def min_curvature(self) -> float:
        """Smallest Hessian eigenvalue a - b w^2 (negative means non-convex)."""
        return self.a - self.b * self.w**2

    @property
    def f_inf(self) -> float:
        """Global minimum -b d, attained at x = 0."""
        return -self.b * self.d

    @staticmethod
    def _lib(x):
        import torch

        return (torch, x) if isinstance(x, torch.Tensor) else (np, np.asarray(x, dtype=np.float64))

    def value(self, x):
        lib, x = self._lib(x)
        return (0.5 * self.a * x * x - self.b * lib.cos(self.w * x)).sum(-1)

    def grad(self, x):
        lib, x = self._lib(x)
        return self.a * x + self.b * self.w * lib.sin(self.w * x)

    def hessian_diag(self, x):
        lib, x = self._lib(x)
        return self.a + self.b * self.w**2 * lib.cos(self.w * x)

    def default_start(self) -> np.ndarray:
        """x_0 = (3, -3, 3, ...): away from 0, across several ripples."""
        return 3.0 * (-1.0) ** np.arange(self.d, dtype=np.float64)


def gradient_norm_trace(
    alpha,
    tau,
    gamma,
    K,
    seeds: Sequence[int],
    *,
    sigma2,
    problem: RippledQuadratic | None = None,
    x0=None,
    chunk: int = 512,
) -> np.ndarray:
    """||grad f(y_k)||^2 for k = 0..K-1 of serial Lookahead with SGD, one column per seed.

    Every seed is an independent run, all run at once as a batch in float64:

        x <- x - gamma (grad f(x) + xi_k),   xi_k ~ N(0, (sigma2 / d) I)
        if (k + 1) mod tau == 0:  z <- z + alpha (x - z);  x <- z

    from x_0 = z_0 = x0, with y_k = alpha x_k + (1 - alpha) z_k (eq. 8).  The noise
    is unbiased with total variance sigma2, as Theorem 2 assumes.  Seed s draws its
    noise from ``numpy.random.default_rng(s)`` in step order, so a run depends only
    on its own seed.  Returns an array of shape (K, len(seeds)).
    """
    alpha, gamma, tau = _alpha(alpha), _pos("gamma", gamma), _tau(tau)
    K, sigma2 = check_int(K, "K"), _nonneg("sigma2", sigma2)
    problem = RippledQuadratic() if problem is None else problem
    seeds = [check_int(s, "seeds[i]", low=0) for s in seeds]
    if not seeds:
        raise ConfigError("seeds must be a non-empty sequence of integers, got []")
    x0 = problem.default_start() if x0 is None else np.asarray(x0, dtype=np.float64)
    if x0.shape != (problem.d,):
        raise ConfigError(f"x0 must have shape ({problem.d},), got {x0.shape}")
    rngs = [np.random.default_rng(s) for s in seeds]
    scale = math.sqrt(sigma2 / problem.d)
    x = np.tile(x0, (len(seeds), 1))
    z = x.copy()
    out = np.empty((K, len(seeds)))
    for start in range(0, K, chunk):
        n = min(chunk, K - start)
        noise = np.stack([r.standard_normal((n, problem.d)) for r in rngs], axis=1) * scale
        for j in range(n):
            k = start + j
            y = x if (k % tau == 0 or alpha == 1.0) else alpha * x + (1.0 - alpha) * z
            gy = problem.grad(y)
            out[k] = np.einsum("sd,sd->s", gy, gy)
            gx = gy if y is x else problem.grad(x)
            x = x - gamma * (gx + noise[j])
            if (k + 1) % tau == 0:
                z = z + alpha * (x - z)
                x = z
    return out


def empirical_gradient_norm(
    alpha, tau, gamma, K, seeds: Sequence[int], *, sigma2, problem: RippledQuadratic | None = None, x0=None
) -> np.ndarray:
    """(1/K) sum_{k<K} ||grad f(y_k)||^2 per seed: the left side of eq. (14) before the mean over seeds.

    Runs :func:`gradient_norm_trace` and averages over steps; returns shape (len(seeds),).
    """
    return gradient_norm_trace(alpha, tau, gamma, K, seeds, sigma2=sigma2, problem=problem, x0=x0).mean(axis=0)
