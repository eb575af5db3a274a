"""The reference engine's two orders of mixing and update, and its overlapped slow step, against plain loops.

Adapt-then-combine (the default) is X_{k+1} = (X_k - G_k) P_k; combine-then-adapt is X_{k+1} = X_k P_k - G_k,
with G_k taken from the gradient at X_k and applied to the combined point. Every comparison with a plain loop:
max |a - b| <= 1e-12 * max(1, max |b|) (float64); "bitwise" means torch.equal.
"""

import numpy as np
import pytest
import torch

from lookahead_dist.errors import ConfigError
from lookahead_dist.mixing import Schedule
from lookahead_dist.reference.problems import Quadratic, rng, tiny_regression
from lookahead_dist.reference.simulate import Reference, SlowMomentum, simulate

TOL = 1e-12
F64 = torch.float64
CTA, ATC = "combine_then_adapt", "adapt_then_combine"


def assert_close(a, b, tol=TOL):
    a, b = torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(1.0, b.abs().max().item() if b.numel() else 0.0)
    assert err <= tol * scale, f"max |a - b| = {err:.3e} > {tol:g} * {scale:.3g}"


def ring_matrix(n):
    """Metropolis-Hastings ring: 1/3 to self and each neighbour (doubly stochastic)."""
    P = np.zeros((n, n))
    for i in range(n):
        for j in (i - 1, i, i + 1):
            P[j % n, i] += 1.0 / 3.0
    return P


def directed_row_stochastic():
    """A directed, strongly connected, non-regular graph; each sender splits its mass evenly."""
    out = {0: [1, 2, 3], 1: [2], 2: [3], 3: [4, 0], 4: [0]}
    P = np.zeros((5, 5))
    for i, peers in out.items():
        for j in [i] + peers:
            P[i, j] = 1.0 / (len(peers) + 1)
    return P


def column_stochastic_with_slow():
    """Three fast agents on a non-symmetric column-stochastic P, and a slow agent 3 that pulls from agent 0."""
    P = np.array(
        [
            [0.5, 0.2, 0.3, 0.25],
            [0.25, 0.6, 0.0, 0.0],
            [0.25, 0.0, 0.7, 0.0],
            [0.0, 0.2, 0.0, 0.75],
        ]
    )
    assert np.abs(P.sum(axis=0) - 1).max() < 1e-15
    return P


OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.05),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.1),
}

CASES = {
    # name: (P, push_sum, roles)
    "column_stochastic_slow": (column_stochastic_with_slow(), False, ["fast"] * 3 + ["slow"]),
    "push_sum": (directed_row_stochastic(), True, ["fast"] * 5),
}


def plain_loop(P, push_sum, roles, x0, objective, make_opt, steps, order, slow=None, lr_of=None):
    """Agents as a list of (d,) tensors with their own optimizers, mixed by explicit weighted sums.

    ``slow``: None, or (alpha, beta, tau, overlap): slow momentum on z, driven by torch.optim.SGD with
    momentum beta on the pseudo-gradient (z - x_bar) / gamma, blocking or overlapped by one step.
    ``lr_of(k)``: the fast learning rate of step k (default: the optimizers' own).
    Yields, after each step, (de-biased models (n, d), z or None, the pending sync or None).
    """
    n = len(roles)
    fast = [i for i in range(n) if roles[i] == "fast"]
    xs = [(x0 if x0.dim() == 1 else x0[i]).clone() for i in range(n)]
    ws = [torch.ones((), dtype=F64) for _ in range(n)]
    opts = {i: make_opt([xs[i]]) for i in fast}
    if slow is not None:
        alpha, beta, tau, overlap = slow
        z = x0.clone()
        outer = torch.optim.SGD([z], lr=1.0, momentum=beta)
    pending = gamma = None

    def mix():
        new = [sum(P[i, j] * xs[i] for i in range(n)) for j in range(n)]
        neww = [sum(P[i, j] * ws[i] for i in range(n)) for j in range(n)]
        for j in range(n):
            xs[j].copy_(new[j])
            if push_sum:
                ws[j] = neww[j]

    def outer_step(sent_x, sent_w, g):
        x_bar = sum(sent_x[i] for i in fast) / sum(sent_w[i] for i in fast)
        outer.param_groups[0]["lr"] = alpha * g
        z.grad = (z - x_bar) / g
        outer.step()

    for k in range(steps):
        if lr_of is not None:
            for o in opts.values():
                o.param_groups[0]["lr"] = lr_of(k)
        if slow is not None and k % tau == 0:
            gamma = opts[fast[0]].param_groups[0]["lr"]
        grads = {i: objective.loss_and_grad(i, k, xs[i] / ws[i])[1] for i in fast}
        if order == CTA:
            mix()
        for i in fast:
            xs[i].grad = grads[i]
            opts[i].step()
        if order == ATC:
            mix()
        if slow is not None:
            if overlap:
                if pending is not None:
                    sent_x, sent_w, g = pending
                    pending = None
                    outer_step(sent_x, sent_w, g)
                    for i in range(n):
                        xs[i].copy_(z + (xs[i] / ws[i] - sent_x[i] / sent_w[i]))
                        ws[i] = torch.ones((), dtype=F64)
                if (k + 1) % tau == 0:
                    pending = ([x.clone() for x in xs], [w.clone() for w in ws], gamma)
            elif (k + 1) % tau == 0:
                outer_step(xs, ws, gamma)
                for i in range(n):
                    xs[i].copy_(z)
                    ws[i] = torch.ones((), dtype=F64)
        Z = torch.stack([xs[i] / ws[i] for i in range(n)])
        yield Z, (None if slow is None else z.clone()), pending


def make_ref(P, push_sum, roles, x0, objective, make_opt, **kw):
    return Reference(Schedule.static(P, push_sum=push_sum), roles, x0, objective, make_opt, **kw)


# -- the default order is today's step, bitwise ----------------------------------------------------------------


@pytest.mark.parametrize("vectorized", [False, True])
def test_default_order_is_adapt_then_combine_bitwise(vectorized):
    P, push_sum, roles = CASES["push_sum"]
    q = Quadratic(d=5, n=len(roles), seed=30, noise=0.3)
    kw = dict(slow_momentum=SlowMomentum(0.7, 0.5, 3), optimizer_state="average", vectorized=vectorized)
    default = make_ref(P, push_sum, roles, q.initial(), q, OPTIMIZERS["adamw"], **kw)
    explicit = make_ref(P, push_sum, roles, q.initial(), q, OPTIMIZERS["adamw"], order=ATC, **kw)
    assert default.order == ATC and not default.overlap_slow and default.vectorized is vectorized
    for _ in range(10):
        default.step()
        explicit.step()
        assert torch.equal(default.numerators, explicit.numerators)
        assert torch.equal(default.weights, explicit.weights)
        assert torch.equal(default.last_update, explicit.last_update)
        assert default.pending_slow is None


def test_default_order_equals_a_plain_loop_bitwise():
    """Two fast agents on a 2 x 2 column-stochastic P: the loop does the same float operations, so equal bits."""
    P = np.array([[0.75, 0.5], [0.25, 0.5]])
    q = Quadratic(d=3, n=2, seed=31, noise=0.2)
    x0 = torch.randn(2, 3, generator=rng(4, "x0"), dtype=F64)
    make = OPTIMIZERS["sgd_momentum_wd"]
    ref = Reference(Schedule.static(P), ["fast", "fast"], x0, q, make, vectorized=False)
    rows = [x0[i].clone() for i in range(2)]
    opts = [make([x]) for x in rows]
    Pt = torch.tensor(P.T, dtype=F64)
    for k in range(6):
        for i in range(2):
            rows[i].grad = q.loss_and_grad(i, k, rows[i].clone())[1]
            opts[i].step()
        xs = Pt @ torch.stack(rows)
        for i in range(2):
            rows[i].copy_(xs[i])
        ref.step()
        assert torch.equal(ref.X, xs), k
    assert (xs[0] - xs[1]).abs().max() > 1e-3  # not yet at consensus: the check saw two different agents


# -- combine-then-adapt against a plain loop --------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("vectorized", [False, True])
def test_combine_then_adapt_equals_plain_loop(case, opt, vectorized):
    P, push_sum, roles = CASES[case]
    n, K = len(roles), 12
    q = Quadratic(d=5, n=n, seed=32, noise=0.4)
    x0 = torch.randn(n, 5, generator=rng(5, "x0"), dtype=F64)
    ref = make_ref(P, push_sum, roles, x0, q, OPTIMIZERS[opt], order=CTA, vectorized=vectorized)
    atc = make_ref(P, push_sum, roles, x0, q, OPTIMIZERS[opt], vectorized=vectorized)
    assert ref.order == CTA and ref.vectorized is vectorized
    for Z, _, _ in plain_loop(P, push_sum, roles, x0, q, OPTIMIZERS[opt], K, CTA):
        before = ref.numerators
        ref.step()
        atc.step()
        assert_close(ref.X, Z)
        if "slow" in roles:
            assert ref.last_update[3].abs().max() == 0  # the slow agent is mixed, never stepped
            assert ref.X[3].sub(x0[3]).abs().max() > 0
    # weight decay reads the combined point, so the two orders part ways
    assert (ref.X - atc.X).abs().max() > 1e-6
    assert (before - ref.numerators).abs().max() > 1e-6


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_combine_then_adapt_vectorized_equals_per_agent(case, opt):
    P, push_sum, roles = CASES[case]
    n = len(roles)
    q = Quadratic(d=6, n=n, seed=33, noise=0.3)
    x0 = q.initial()
    kw = dict(order=CTA, slow_momentum=SlowMomentum(0.6, 0.4, 4), optimizer_state="average", record_every=1)
    runs = {}
    for vec in (False, True):
        ref = make_ref(P, push_sum, roles, x0, q, OPTIMIZERS[opt], vectorized=vec, **kw)
        assert ref.vectorized is vec
        runs[vec] = ref.run(13)
    for k in range(14):
        assert_close(runs[True].X[k], runs[False].X[k])
    assert_close(runs[True].y, runs[False].y)
    assert runs[False].consensus[-1] > 1e-6  # step 13: the agents disagree between slow steps


def test_combine_then_adapt_with_gradient_mixing_and_module_problem():
    n, K = 3, 6
    prob = tiny_regression(n, seed=34)
    P = ring_matrix(n) * 0.5 + np.eye(n) * 0.5
    make = OPTIMIZERS["sgd_momentum_wd"]
    ref = Reference(Schedule.static(P), ["fast"] * n, prob.x0, prob, make, order=CTA, grad_mixing="average")
    xs = [prob.x0.clone() for _ in range(n)]
    opts = [make([x]) for x in xs]
    for k in range(K):
        g = torch.stack([prob.loss_and_grad(i, k, xs[i])[1] for i in range(n)]).mean(dim=0)
        new = [sum(P[i, j] * xs[i] for i in range(n)) for j in range(n)]
        for i in range(n):
            xs[i].copy_(new[i])
            xs[i].grad = g.clone()
            opts[i].step()
        ref.step()
        assert_close(ref.X, torch.stack(xs))


def test_combine_then_adapt_with_identity_mixing_is_adapt_then_combine_bitwise():
    n = 3
    q = Quadratic(d=4, n=n, seed=35, noise=0.5)
    x0 = torch.randn(n, 4, generator=rng(6, "x0"), dtype=F64)
    for vec in (False, True):
        trs = [
            simulate(
                Schedule.static(np.eye(n)),
                ["fast"] * n,
                x0,
                q,
                OPTIMIZERS["adamw"],
                9,
                order=order,
                vectorized=vec,
                slow_momentum=SlowMomentum(0.5, 0.3, 4),
                record_every=1,
            )
            for order in (ATC, CTA)
        ]
        for k in range(10):
            assert torch.equal(trs[0].X[k], trs[1].X[k])
        assert (trs[0].X[9] - x0).abs().min() > 0  # the agents moved


@pytest.mark.parametrize("case", list(CASES))
def test_learning_rate_zero_orders_agree(case):
    P, push_sum, roles = CASES[case]
    n = len(roles)
    q = Quadratic(d=4, n=n, seed=36, noise=0.5)
    x0 = torch.randn(n, 4, generator=rng(7, "x0"), dtype=F64)
    make = lambda p: torch.optim.SGD(p, lr=0.0, momentum=0.9, weight_decay=0.1)  # noqa: E731
    trs = [simulate(Schedule.static(P, push_sum=push_sum), roles, x0, q, make, 8, order=o) for o in (ATC, CTA)]
    assert torch.equal(trs[0].X[8], trs[1].X[8])
    assert_close(trs[0].consensus, trs[1].consensus)
    assert trs[1].consensus[8] < 0.5 * trs[1].consensus[0]  # mixing happened


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("vectorized", [False, True])
def test_eq8_combine_then_adapt(case, vectorized):
    P, push_sum, roles = CASES[case]
    n = len(roles)
    q = Quadratic(d=5, n=n, seed=37, noise=0.3)
    x0 = torch.randn(n, 5, generator=rng(8, "x0"), dtype=F64)
    ref = make_ref(P, push_sum, roles, x0, q, OPTIMIZERS["adamw"], order=CTA, vectorized=vectorized)
    assert ref.a_invariant
    a = ref.a
    assert_close(torch.tensor(P, dtype=F64) @ a, a)
    tr = ref.run(1)
    assert_close(tr.y[1], tr.y[0] - a @ ref.last_update)
    for _ in range(15):
        y = a @ ref.numerators
        ref.step()
        assert_close(a @ ref.numerators, y - a @ ref.last_update)
        assert ref.last_update.abs().max() > 0


# -- the overlapped slow step ------------------------------------------------------------------------------------

OVERLAP_CASES = {
    # name: (P, push_sum, roles, order, (alpha, beta, tau))
    "column_stochastic_atc": (column_stochastic_with_slow(), False, ["fast"] * 3 + ["slow"], ATC, (0.8, 0.6, 3)),
    "column_stochastic_cta": (column_stochastic_with_slow(), False, ["fast"] * 3 + ["slow"], CTA, (0.8, 0.6, 3)),
    "push_sum_cta": (directed_row_stochastic(), True, ["fast"] * 5, CTA, (0.7, 0.5, 4)),
    "push_sum_atc_tau1": (directed_row_stochastic(), True, ["fast"] * 5, ATC, (0.5, 0.4, 1)),
    "local_tau1_cta": (np.eye(3), False, ["fast"] * 3, CTA, (1.0, 0.3, 1)),
}


@pytest.mark.parametrize("case", list(OVERLAP_CASES))
@pytest.mark.parametrize("vectorized", [False, True])
def test_overlap_slow_equals_plain_loop(case, vectorized):
    P, push_sum, roles, order, (alpha, beta, tau) = OVERLAP_CASES[case]
    n, K, lr0 = len(roles), 13, 0.1
    q = Quadratic(d=5, n=n, seed=38, noise=0.4)
    x0 = q.initial()
    make = lambda p: torch.optim.SGD(p, lr=lr0, momentum=0.9, weight_decay=0.05)  # noqa: E731
    ref = make_ref(
        P,
        push_sum,
        roles,
        x0,
        q,
        make,
        order=order,
        vectorized=vectorized,
        slow_momentum=SlowMomentum(alpha, beta, tau),
        overlap_slow=True,
    )
    assert ref.overlap_slow and ref.vectorized is vectorized
    blocking = make_ref(P, push_sum, roles, x0, q, make, order=order, slow_momentum=SlowMomentum(alpha, beta, tau))
    lr_of = lambda k: lr0 * (1 - 0.04 * k)  # noqa: E731  (not geometric: gamma must be the one saved)
    loop = plain_loop(P, push_sum, roles, x0, q, make, K, order, slow=(alpha, beta, tau, True), lr_of=lr_of)
    for k, (Z, z, pending) in enumerate(loop):
        for o in ref.optimizers + blocking.optimizers:
            o.param_groups[0]["lr"] = lr_of(k)
        ref.step()
        blocking.step()
        assert_close(ref.X, Z)
        assert_close(ref.slow_model, z)
        p = ref.pending_slow
        if pending is None:
            assert p is None
        else:
            assert p.step == k and p.gamma == pending[2]
            assert_close(p.numerators, torch.stack(pending[0]))
            if push_sum:
                assert_close(p.weights, torch.stack(pending[1]))
            else:
                assert p.weights is None
        if k == tau - 1:  # the slow step started but has not been applied: nobody moved to z yet
            assert p is not None and torch.equal(ref.slow_model, x0)
            assert not torch.equal(blocking.slow_model, x0)
        if k == tau:  # applied one step late
            assert not torch.equal(ref.slow_model, x0)
    assert (ref.X - blocking.X).abs().max() > 1e-6  # the delay changes the trajectory


def test_overlap_slow_pending_is_a_copy():
    q = Quadratic(d=3, n=3, seed=40)
    ref = Reference(
        Schedule.static(ring_matrix(3)),
        ["fast"] * 3,
        q.initial(),
        q,
        lambda p: torch.optim.SGD(p, lr=0.1),
        slow_momentum=SlowMomentum(1.0, 0.0, 2),
        overlap_slow=True,
    )
    ref.step()
    assert ref.pending_slow is None
    ref.step()
    p = ref.pending_slow
    assert p is not None and p.step == 1
    p.numerators.zero_()
    assert ref.pending_slow.numerators.abs().max() > 0


@pytest.mark.parametrize("tau", [2, 3])
def test_overlap_slow_without_gradients_reaches_the_average(tau):
    """No gradient progress (zero curvature, no noise: the same iterates as lr 0), alpha = 1, beta = 0.

    Slow momentum itself needs a positive lr (it divides by it), so the gradient is zero instead.
    Each sync moves every agent to the average it was sent plus its own mixing since; the ring keeps
    the mean, so the agents reach the initial average.
    """
    n, d = 8, 4
    q = Quadratic(d=d, n=n, seed=41, curvature=(0.0, 0.0))
    x0 = torch.randn(n, d, generator=rng(9, "x0"), dtype=F64)
    avg = x0.mean(dim=0)
    ref = Reference(
        Schedule.static(ring_matrix(n)),
        ["fast"] * n,
        x0,
        q,
        lambda p: torch.optim.SGD(p, lr=0.1),
        slow_momentum=SlowMomentum(alpha=1.0, beta=0.0, tau=tau),
        overlap_slow=True,
        order=CTA,
    )
    tr = ref.run(100)
    assert tr.consensus[0] > 1.0
    assert (tr.X[100] - avg).abs().max() <= 1e-10
    assert_close(tr.y[-1], avg)
    assert_close(ref.slow_model, avg)


# -- argument checks ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(order="cta"), "order: .*'cta'"),
        (dict(order=None), "order: .*None"),
        (dict(overlap_slow=True), "overlap_slow: True needs slow_momentum"),
        (dict(overlap_slow=1, slow_momentum=SlowMomentum(0.5, 0.5, 2)), "overlap_slow: .*got 1"),
    ],
)
def test_bad_order_and_overlap_slow_raise_config_error(kw, match):
    q = Quadratic(d=2, n=2, seed=0)
    with pytest.raises(ConfigError, match=match):
        Reference(Schedule.static(np.eye(2)), ["fast", "fast"], torch.zeros(2), q, OPTIMIZERS["adamw"], **kw)
