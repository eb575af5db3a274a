"""The reference engine's outer optimizers and streaming fragments, against SlowMo's rule and plain loops.

Every comparison: max |a - b| <= tol * max(1, max |b|) in float64; "bitwise" means torch.equal.
"""

import numpy as np
import pytest
import torch

from lookahead_dist.errors import ConfigError
from lookahead_dist.mixing import Schedule
from lookahead_dist.outer import ELEMENTWISE, fragment_due, fragment_offsets, split_fragments
from lookahead_dist.reference.problems import Quadratic
from lookahead_dist.reference.simulate import Reference, SlowMomentum

pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")

TOL = 1e-12
F64 = torch.float64
N, D = 4, 7
SHAPES = [(3,), (2, 2)]  # fragments of 2: elements 0..2 and 3..6


def assert_close(a, b, tol=TOL):
    err = (a - b).abs().max().item()
    scale = max(1.0, b.abs().max().item())
    assert err <= tol * scale, f"max |a - b| = {err:.3e} > {tol:g} * {scale:.3g}"


def ring(n):
    P = np.zeros((n, n))
    for i in range(n):
        for j in (i - 1, i, i + 1):
            P[j % n, i] += 1.0 / 3.0
    return P


def push_sum_matrix(n):
    """Row-stochastic (each sender splits its mass), directed, not column-stochastic: i sends to i + 1,
    and agent 0 also to agent 2."""
    P = np.zeros((n, n))
    for i in range(n):
        peers = [i, (i + 1) % n] + ([2] if i == 0 else [])
        for j in peers:
            P[i, j] += 1.0 / len(peers)
    return P


SCHEDULES = {"ring": Schedule([ring(N)]), "push_sum": Schedule([push_sum_matrix(N)], push_sum=True)}


def problem():
    return Quadratic(d=D, n=N, seed=4, noise=0.3)


def x0():
    return torch.linspace(-1.0, 1.0, D, dtype=F64)


def run(schedule, sm, steps, *, lr=0.1, decay=None, overlap_slow=False, inner=None, outer_decay=None):
    q = problem()
    ref = Reference(
        schedule,
        ["fast"] * N,
        x0(),
        q,
        inner or (lambda p: torch.optim.SGD(p, lr=lr)),
        slow_momentum=sm,
        overlap_slow=overlap_slow,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(ref.outer, lambda k: outer_decay**k) if outer_decay else None
    hist = [ref.X]
    for k in range(steps):
        ref.step()
        if decay is not None:
            for opt in ref.optimizers:
                opt.param_groups[0]["lr"] = lr * decay ** (k + 1)
        if sched is not None:
            sched.step()
        hist.append(ref.X)
    return ref, torch.stack(hist)


def plain_fragments(P, push_sum, tau, F, frags, alpha, beta, lrs, steps, overlap=False):
    """SlowMo over a gossip base with fragments, written out (adapt-then-combine, plain SGD)."""
    q = problem()
    X = x0().repeat(N, 1)
    w = torch.ones(N, dtype=F64)
    Pt = torch.tensor(P.T, dtype=F64)
    z, u = x0().clone(), torch.zeros(D, dtype=F64)
    offsets = [f * tau // F for f in range(F)]
    gamma, pending = [None] * F, None
    hist = [X.clone()]

    def slow(Xs, ws, f, g):
        lo, hi = frags[f]
        x_bar = Xs[:, lo:hi].sum(dim=0) / ws.sum() if push_sum else Xs[:, lo:hi].mean(dim=0)
        u[lo:hi] = beta * u[lo:hi] + (z[lo:hi] - x_bar) / g
        z[lo:hi] = z[lo:hi] - alpha * g * u[lo:hi]
        return lo, hi

    for k in range(steps):
        for f in range(F):
            if k == 0 or (k - offsets[f]) % tau == 0:
                gamma[f] = lrs[k]
        Z = X / w[:, None]
        G = torch.stack([q.loss_and_grad(i, k, Z[i])[1] for i in range(N)]) * lrs[k]
        X = Pt @ (X - G)
        if push_sum:
            w = Pt @ w
        due = next((f for f in range(F) if (k + 1 - offsets[f]) % tau == 0), None)
        if overlap:
            if pending is not None:
                Xs, ws, f, g = pending
                lo, hi = slow(Xs, ws, f, g)
                local = X[:, lo:hi] / w[:, None] - Xs[:, lo:hi] / ws[:, None]
                X[:, lo:hi] = (z[lo:hi] + local) * w[:, None]
                pending = None
            if due is not None:
                pending = (X.clone(), w.clone(), due, gamma[due])
        elif due is not None:
            lo, hi = slow(X, w, due, gamma[due])
            X[:, lo:hi] = z[lo:hi] * w[:, None]
        hist.append(X / w[:, None])
    return torch.stack(hist)


# -- fragments ----------------------------------------------------------------------------------------


def test_split_fragments_nearly_equal_bytes_at_tensor_boundaries():
    assert split_fragments([256, 32, 32, 1], 1) == [0, 4]
    assert split_fragments([256, 32, 32, 1], 2) == [0, 1, 4]
    assert split_fragments([1] * 8, 4) == [0, 2, 4, 6, 8]
    assert split_fragments([10, 10, 10, 10, 10, 10], 3) == [0, 2, 4, 6]
    assert split_fragments([5, 1, 1, 1, 1, 1], 2) == [0, 1, 6]
    with pytest.raises(ConfigError, match="3 fragments need at least 3 tensors, the model has 2"):
        split_fragments([4, 4], 3)


@pytest.mark.parametrize("tau, F", [(1, 1), (4, 2), (5, 3), (6, 6), (12, 5)])
def test_each_fragment_syncs_once_per_tau_steps_and_one_at_a_time(tau, F):
    offsets = fragment_offsets(tau, F)
    assert offsets[0] == 0 and offsets == sorted(set(offsets))
    for start in range(1, 3 * tau):
        due = [fragment_due(k, tau, offsets) for k in range(start, start + tau)]
        assert sorted(f for f in due if f is not None) == list(range(F))


@pytest.mark.parametrize("name", ["ring", "push_sum"])
@pytest.mark.parametrize("overlap", [False, True])
def test_fragments_equal_plain_loop(name, overlap):
    """F = 2, decaying lr (each fragment's gamma is the lr at its own window's start)."""
    tau, F, alpha, beta, lr, decay, steps = 4, 2, 0.8, 0.6, 0.1, 0.95, 17
    sm = SlowMomentum(alpha=alpha, beta=beta, tau=tau, fragments=F, param_shapes=SHAPES)
    _, hist = run(SCHEDULES[name], sm, steps, lr=lr, decay=decay, overlap_slow=overlap)
    lrs = [lr * decay**k for k in range(steps)]
    P = SCHEDULES[name].phases[0].matrix
    expect = plain_fragments(P, name == "push_sum", tau, F, [(0, 3), (3, 7)], alpha, beta, lrs, steps, overlap)
    assert_close(hist, expect)
    # and it is not the unfragmented run
    _, whole = run(SCHEDULES[name], SlowMomentum(alpha=alpha, beta=beta, tau=tau), steps, lr=lr, decay=decay)
    assert (whole - hist).abs().max() > 1e-6


def test_push_sum_fragment_sync_keeps_the_weights():
    """tau = 2, F = 2: fragment 0 syncs at the ends of steps 1, 3, ..., fragment 1 at the ends of steps 0, 2, ...
    A sync sets the fragment's de-biased models to z and leaves the push-sum weights as they are."""
    sm = SlowMomentum(alpha=1.0, beta=0.0, tau=2, fragments=2, param_shapes=SHAPES)
    ref, _ = run(SCHEDULES["push_sum"], sm, 3)
    assert (ref.weights - 1.0).abs().max() > 1e-3
    X = ref.X
    assert_close(X[:, 3:], ref.slow_model[3:].expand(N, 4))  # fragment 1, synced at the end of step 2
    assert (X[:, :3] - X[0, :3]).abs().max() > 1e-6  # fragment 0 moved apart again in step 2


def test_one_fragment_is_bitwise_the_plain_slow_step():
    for name in SCHEDULES:
        _, a = run(SCHEDULES[name], SlowMomentum(alpha=0.7, beta=0.5, tau=3), 10, decay=0.9)
        _, b = run(SCHEDULES[name], SlowMomentum(alpha=0.7, beta=0.5, tau=3, fragments=1), 10, decay=0.9)
        assert torch.equal(a, b)


# -- outer optimizers ---------------------------------------------------------------------------------


def sgd_rule(p):
    return torch.optim.SGD(p, lr=0.7, momentum=0.5)


@pytest.mark.parametrize("name", ["ring", "push_sum"])
@pytest.mark.parametrize("overlap", [False, True])
def test_outer_sgd_is_the_rule_while_lr_is_constant(name, overlap):
    rule = SlowMomentum(alpha=0.7, beta=0.5, tau=3)
    _, a = run(SCHEDULES[name], rule, 13, overlap_slow=overlap)
    _, b = run(SCHEDULES[name], SlowMomentum(tau=3, outer=sgd_rule), 13, overlap_slow=overlap)
    assert_close(b, a, 1e-10)


def test_scale_by_gamma_is_the_rule_for_any_schedule():
    rule = SlowMomentum(alpha=0.7, beta=0.5, tau=3)
    _, a = run(SCHEDULES["ring"], rule, 13, decay=0.85)
    _, plain = run(SCHEDULES["ring"], SlowMomentum(tau=3, outer=sgd_rule), 13, decay=0.85)
    _, scaled = run(SCHEDULES["ring"], SlowMomentum(tau=3, outer=sgd_rule, scale_by_gamma=True), 13, decay=0.85)
    assert (plain - a).abs().max() > 1e-8  # the momentum is remembered at the old gamma
    assert_close(scaled, a, 1e-10)


def test_outer_sgd_lr_one_is_the_exact_average():
    """SGD(lr=1) without momentum: z <- x_bar, the rule with alpha = 1, beta = 0 (an exact average)."""
    _, hist = run(SCHEDULES["ring"], SlowMomentum(tau=3, outer=lambda p: torch.optim.SGD(p, lr=1.0)), 9)
    _, rule = run(SCHEDULES["ring"], SlowMomentum(alpha=1.0, beta=0.0, tau=3), 9)
    assert_close(hist, rule)


@pytest.mark.parametrize("F", [1, 2])
def test_elementwise_outer_does_not_depend_on_the_split(F):
    """Adam over the model's shapes, or over one view per fragment: the same run (element-wise)."""

    def adam(p):
        return torch.optim.Adam(p, lr=0.05)

    _, a = run(SCHEDULES["push_sum"], SlowMomentum(tau=4, outer=adam, fragments=F, param_shapes=SHAPES), 13)
    _, b = run(SCHEDULES["push_sum"], SlowMomentum(tau=4, outer=adam, fragments=F), 13)
    assert_close(a, b)


def test_outer_gets_views_of_z_with_the_shapes():
    seen = []

    def factory(params):
        seen.extend(params)
        return torch.optim.SGD(params, lr=0.5)

    ref, _ = run(SCHEDULES["ring"], SlowMomentum(tau=2, outer=factory, param_shapes=SHAPES), 4)
    assert [tuple(p.shape) for p in seen] == SHAPES
    assert torch.equal(torch.cat([p.reshape(-1) for p in seen]), ref.slow_model)
    assert ref.outer is not None and all(p.grad is None for p in seen)


def test_outer_lr_scheduler_is_followed():
    """SGD without momentum: z <- z - lr_t (z - x_bar), i.e. the rule with beta 0 and alpha = lr_t."""
    _, sched = run(
        SCHEDULES["ring"], SlowMomentum(tau=2, outer=lambda p: torch.optim.SGD(p, lr=1.0)), 6, outer_decay=0.5
    )
    # the outer lr is 0.5^k after k inner steps: the syncs at the ends of steps 1, 3, 5 use 0.5, 0.125, 0.03125
    q, P = problem(), torch.tensor(ring(N).T, dtype=F64)
    X, z = x0().repeat(N, 1), x0().clone()
    for k in range(6):
        G = torch.stack([q.loss_and_grad(i, k, X[i])[1] for i in range(N)]) * 0.1
        X = P @ (X - G)
        if k % 2 == 1:
            z = z - 0.5**k * (z - X.mean(dim=0))
            X = z.repeat(N, 1)
    assert_close(sched[-1], X)


# -- argument checks ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(alpha=0.5, outer=sgd_rule), r"alpha and beta must stay None with it \(got alpha=0.5, beta=None\)"),
        (dict(beta=0.5, outer=sgd_rule), r"\(got alpha=None, beta=0.5\)"),
        (dict(scale_by_gamma=True), "scale_by_gamma: True scales an outer optimizer, but outer is None"),
        (dict(fragments=5, tau=4), r"fragments must be an integer in \[1, tau\] = \[1, 4\], got 5"),
        (dict(fragments=0), r"fragments must be an integer in \[1, tau\]"),
        (dict(outer="SGD"), "outer: must be a callable"),
        (dict(param_shapes=[(2, "a")]), r"param_shapes\[0\]: must be a tuple of ints"),
    ],
)
def test_slow_momentum_argument_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        SlowMomentum(**{"tau": 4, **kw})


@pytest.mark.parametrize(
    "sm, kw, match",
    [
        (dict(param_shapes=[(3,), (3,)]), {}, "sizes sum to 6, not d = 7"),
        (dict(fragments=2, param_shapes=[(7,)]), {}, "2 fragments need at least 2 tensors, the model has 1"),
        (dict(fragments=2), dict(optimizer_state="reset"), "fragments=2 needs 'keep'"),
        (dict(outer=lambda p: torch.optim.LBFGS(p)), {}, "LBFGS needs a closure"),
        (dict(outer=lambda p: torch.optim.SparseAdam(p)), {}, "SparseAdam takes sparse gradients"),
        (dict(outer=lambda p: torch.optim.Adafactor(p), fragments=2), {}, "Adafactor is not element-wise"),
        (dict(outer=lambda p: torch.optim.SGD([torch.zeros(2)], lr=1)), {}, "exactly the 1 slow-copy tensors"),
        (dict(outer=lambda p: 3), {}, "must return a torch.optim.Optimizer, got int"),
    ],
)
def test_reference_outer_errors(sm, kw, match):
    q = problem()
    with pytest.raises(ConfigError, match=match):
        Reference(
            SCHEDULES["ring"],
            ["fast"] * N,
            x0(),
            q,
            lambda p: torch.optim.SGD(p, lr=0.1),
            slow_momentum=SlowMomentum(**{"tau": 4, **sm}),
            **kw,
        )


def test_elementwise_list_holds_the_documented_optimizers():
    names = {c.__name__ for c in ELEMENTWISE}
    assert {"SGD", "Adam", "AdamW"} <= names and not names & {"LBFGS", "SparseAdam", "Muon", "Adafactor", "ASGD"}
