"""The float64 reference engine against the paper's identities and independent plain-loop oracles.

Every comparison: max |a - b| <= 1e-12 * max(1, max |b|) (float64).
"""

import itertools

import numpy as np
import pytest
import torch

from lookahead_dist.errors import ConfigError
from lookahead_dist.mixing import Phase, Schedule, lookahead_matrix, lookahead_schedule
from lookahead_dist.reference.problems import (
    ModuleProblem,
    Quadratic,
    flatten_params,
    rng,
    stream_seed,
    tiny_regression,
    unflatten,
)
from lookahead_dist.reference.simulate import Reference, SlowMomentum, simulate

TOL = 1e-12
F64 = torch.float64


def assert_close(a, b, tol=TOL):
    a, b = torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(1.0, b.abs().max().item() if b.numel() else 0.0)
    assert err <= tol * scale, f"max |a - b| = {err:.3e} > {tol:g} * {scale:.3g}"


def sgd_momentum(lr=0.05):
    return lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9)


def adam(lr=0.02):
    return lambda p: torch.optim.Adam(p, lr=lr)


OPTIMIZERS = {"sgd_momentum": sgd_momentum(), "adam": adam()}


def ring_matrix(n):
    """Metropolis-Hastings ring: 1/3 to self and each neighbour (doubly stochastic)."""
    P = np.zeros((n, n))
    for i in range(n):
        for j in (i - 1, i, i + 1):
            P[j % n, i] += 1.0 / 3.0
    return P


def block(W, slow=1):
    """W among the fast agents (first), identity on ``slow`` trailing slow agents."""
    m = W.shape[0]
    P = np.eye(m + slow)
    P[:m, :m] = W
    return P


W3 = np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]])


def metropolis_with_target(a, edges, rng):
    """A column-stochastic P with P a = a: the transpose of a Metropolis-Hastings chain whose stationary law is a.

    The chain M (row-stochastic) moves i -> j with probability q min(1, a_j / a_i) along
    the given undirected edges; a_i M_ij = q min(a_i, a_j) is symmetric (detailed balance),
    so a^T M = a^T, i.e. P a = a for P = M^T, and P's columns (M's rows) sum to 1.
    """
    n = len(a)
    q = rng.uniform(0.3, 1.0) / n
    M = np.zeros((n, n))
    for i, j in edges:
        M[i, j] = q * min(1.0, a[j] / a[i])
        M[j, i] = q * min(1.0, a[i] / a[j])
    M[np.diag_indices(n)] = 1.0 - M.sum(axis=1)
    return M.T


def random_shared_invariant_schedule(n, seed):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.5, 2.0, n)
    a /= a.sum()
    mats = []
    for _ in range(4):
        edges = [(i, j) for i, j in itertools.combinations(range(n), 2) if rng.random() < 0.5]
        mats.append(metropolis_with_target(a, edges, rng))
    e = 0.3
    mats.append((1 - e) * np.outer(a, np.ones(n)) + e * mats[0])
    mats.append(np.eye(n))
    for P in mats:
        assert np.max(np.abs(P @ a - a)) < 1e-15 and np.max(np.abs(P.sum(axis=0) - 1)) < 1e-15
        assert P.min() >= 0
    return Schedule([Phase(P, int(r)) for P, r in zip(mats, rng.integers(1, 3, len(mats)))]), a


# -- eq. 8: y_{k+1} = y_k - G_k a ---------------------------------------------------------------------


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("vectorized", [False, True])
def test_eq8_lookahead(opt, vectorized):
    alpha, tau = 0.6, 4
    q = Quadratic(d=6, n=2, seed=1, noise=0.3)
    ref = Reference(
        lookahead_schedule(alpha, tau), ["fast", "slow"], q.initial(), q, OPTIMIZERS[opt], vectorized=vectorized
    )
    assert ref.vectorized is vectorized
    a = torch.tensor([alpha, 1 - alpha], dtype=F64)
    assert_close(ref.a, a)
    for _ in range(30):
        y = a @ ref.numerators
        ref.step()
        assert_close(a @ ref.numerators, y - a @ ref.last_update)
        assert ref.last_update[1].abs().max() == 0  # the slow agent never steps


def test_eq8_random_time_varying_shared_invariant():
    n = 6
    sched, a = random_shared_invariant_schedule(n, seed=3)
    assert np.max(np.abs(sched.invariant_vector() - a)) < 1e-9
    roles = ["fast", "slow", "fast", "fast", "slow", "fast"]
    q = Quadratic(d=5, n=n, seed=2, noise=0.5)
    x0 = torch.randn(n, 5, generator=rng(0, "x0"), dtype=F64)
    ref = Reference(sched, roles, x0, q, sgd_momentum(0.1), invariant=a)
    assert ref.a_invariant
    at = torch.tensor(a)
    for _ in range(3 * sched.period):
        y = at @ ref.numerators
        ref.step()
        assert_close(at @ ref.numerators, y - at @ ref.last_update)
    tr = ref.run(8)
    assert_close(tr.y[-1], at @ ref.numerators)


def test_eq8_push_sum_mean_of_numerators():
    sched = Schedule.static(directed_row_stochastic(), push_sum=True)
    n = sched.n
    q = Quadratic(d=4, n=n, seed=5, noise=0.2)
    ref = Reference(sched, ["fast"] * n, q.initial(), q, sgd_momentum(0.05))
    tr = ref.run(1)
    for _ in range(20):
        y = ref.numerators.mean(dim=0)
        ref.step()
        assert_close(ref.numerators.mean(dim=0), y - ref.last_update.mean(dim=0))
    assert_close(tr.y[0], q.initial())


# -- eqs. 9-10 and Algorithm 1 ---------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_eqs_9_10_fast_slow_and_y_agree_every_tau(alpha):
    tau = 5
    q = Quadratic(d=7, n=2, seed=4, noise=0.2)
    tr = simulate(lookahead_schedule(alpha, tau), ["fast", "slow"], q.initial(), q, adam(), 6 * tau, record_every=tau)
    assert sorted(tr.X) == [tau * t for t in range(7)]
    for k, X in tr.X.items():
        assert_close(X[0], tr.y[k])
        assert_close(X[1], tr.y[k])
    assert tr.consensus[tau::tau].abs().max() <= 1e-12
    assert tr.consensus[1:tau].min() > 0


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_lookahead_matrix_form_equals_algorithm_1(opt):
    alpha, tau, T = 0.5, 5, 6
    prob = tiny_regression(2, seed=7)
    make = OPTIMIZERS[opt]

    # Algorithm 1 of the paper, as its nested loop.
    z = prob.x0.clone()
    x = prob.x0.clone()
    base = make([x])
    k, slow = 0, [z.clone()]
    for _t in range(T):
        x.copy_(z)  # line 2: x_{t,0} <- z_{t-1}
        for _ in range(tau):  # lines 3-5
            _, g = prob.loss_and_grad(0, k, x)
            x.grad = g
            base.step()
            k += 1
        z = z + alpha * (x - z)  # line 6: z_t = z_{t-1} + alpha (x_{t,tau} - x_{t,0})
        slow.append(z.clone())

    tr = simulate(lookahead_schedule(alpha, tau), ["fast", "slow"], prob.x0, prob, make, T * tau, record_every=tau)
    for t in range(T + 1):
        assert_close(tr.X[t * tau][1], slow[t])
        assert_close(tr.X[t * tau][0], slow[t])
    assert torch.isnan(tr.loss[:, 1]).all() and torch.isfinite(tr.loss[:, 0]).all()


# -- slow momentum ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("buffers", ["keep", "reset", "average"])
def test_slow_momentum_beta0_is_a_matrix_step(buffers):
    alpha, tau = 0.7, 4
    P = block(W3)
    a = np.array([alpha / 3] * 3 + [1 - alpha])
    sync = np.outer(a, np.ones(4))
    matrix_form = Schedule([Phase(P, tau - 1), Phase(sync, 1)])
    q = Quadratic(d=5, n=4, seed=8, noise=0.3)
    roles = ["fast"] * 3 + ["slow"]
    kw = dict(optimizer_state=buffers, record_every=1)
    tr_sm = simulate(
        Schedule.static(P),
        roles,
        q.initial(),
        q,
        sgd_momentum(),
        5 * tau,
        slow_momentum=SlowMomentum(alpha=alpha, beta=0.0, tau=tau),
        **kw,
    )
    tr_mx = simulate(matrix_form, roles, q.initial(), q, sgd_momentum(), 5 * tau, **kw)
    for k in tr_mx.X:
        assert_close(tr_sm.X[k], tr_mx.X[k])


@pytest.mark.parametrize("push_sum", [False, True])
def test_slow_momentum_equals_sgd_oracle(push_sum):
    alpha, beta, tau, lr0, K = 0.8, 0.6, 3, 0.1, 15
    W = W3 if not push_sum else np.array([[0.5, 0.5, 0.0], [0.0, 0.6, 0.4], [0.3, 0.3, 0.4]])
    q = Quadratic(d=5, n=4, seed=9, noise=0.4)
    x0 = q.initial()
    sched = Schedule.static(block(W), push_sum=push_sum)
    ref = Reference(
        sched,
        ["fast"] * 3 + ["slow"],
        x0,
        q,
        sgd_momentum(lr0),
        slow_momentum=SlowMomentum(alpha=alpha, beta=beta, tau=tau),
    )

    # Oracle: three fast agents in a plain loop, z driven by torch.optim.SGD with momentum beta.
    xs = [x0.clone() for _ in range(3)]
    ws = [torch.ones((), dtype=F64) for _ in range(3)]
    opts = [sgd_momentum(lr0)([x]) for x in xs]
    z = x0.clone()
    outer = torch.optim.SGD([z], lr=1.0, momentum=beta)
    gamma = None
    for k in range(K):
        lr = lr0 * (1 - 0.04 * k)  # not geometric, so gamma must be read at the start of each window
        for o in opts + ref.optimizers:
            o.param_groups[0]["lr"] = lr
        if k % tau == 0:
            gamma = lr
        for i in range(3):
            _, g = q.loss_and_grad(i, k, xs[i] / ws[i])
            xs[i].grad = g
            opts[i].step()
        new = [sum(W[i, j] * xs[i] for i in range(3)) for j in range(3)]
        neww = [sum(W[i, j] * ws[i] for i in range(3)) for j in range(3)]
        for j in range(3):
            xs[j].copy_(new[j])
            ws[j] = neww[j]
        if (k + 1) % tau == 0:
            x_bar = sum(xs) / sum(ws)
            outer.param_groups[0]["lr"] = alpha * gamma
            z.grad = (z - x_bar) / gamma
            outer.step()
            for i in range(3):
                xs[i].copy_(z)
                ws[i] = torch.ones((), dtype=F64)
        ref.step()
        assert_close(ref.X[:3], torch.stack([xs[i] / ws[i] for i in range(3)]))
        if (k + 1) % tau == 0:
            assert_close(ref.X[3], z)
            assert_close(ref.slow_model, z)


def test_slowmo_one_worker_beta0_is_lookahead():
    alpha, tau = 0.4, 6
    q = Quadratic(d=6, n=2, seed=10, noise=0.3)
    kw = dict(record_every=1)
    tr_sm = simulate(
        Schedule.static(np.eye(2)),
        ["fast", "slow"],
        q.initial(),
        q,
        adam(),
        4 * tau,
        slow_momentum=SlowMomentum(alpha=alpha, beta=0.0, tau=tau),
        **kw,
    )
    tr_la = simulate(lookahead_schedule(alpha, tau), ["fast", "slow"], q.initial(), q, adam(), 4 * tau, **kw)
    assert not tr_sm.a_invariant  # the identity has no unique invariant vector; y falls back to 1/n
    for k in tr_la.X:
        assert_close(tr_sm.X[k], tr_la.X[k])


def test_slowmo_alpha1_beta0_on_local_sgd_is_periodic_averaging():
    n, tau, K = 4, 5, 20
    q = Quadratic(d=6, n=n, seed=11, noise=0.5)
    tr = simulate(
        Schedule.static(np.eye(n)),
        ["fast"] * n,
        q.initial(),
        q,
        sgd_momentum(),
        K,
        slow_momentum=SlowMomentum(alpha=1.0, beta=0.0, tau=tau),
        record_every=1,
    )
    xs = [q.initial() for _ in range(n)]
    opts = [sgd_momentum()([x]) for x in xs]
    for k in range(K):
        for i in range(n):
            xs[i].grad = q.loss_and_grad(i, k, xs[i])[1]
            opts[i].step()
        if (k + 1) % tau == 0:
            avg = torch.stack(xs).mean(dim=0)
            for x in xs:
                x.copy_(avg)
        assert_close(tr.X[k + 1], torch.stack(xs))


# -- push-sum, consensus ---------------------------------------------------------------------------------


def directed_row_stochastic():
    """A directed, strongly connected, non-regular graph; each sender splits its mass evenly."""
    out = {0: [1, 2, 3], 1: [2], 2: [3], 3: [4, 0], 4: [0]}
    n = len(out)
    P = np.zeros((n, n))
    for i, peers in out.items():
        for j in [i] + peers:
            P[i, j] = 1.0 / (len(peers) + 1)
    return P


def test_push_sum_debiased_agents_reach_the_initial_average():
    sched = Schedule.static(directed_row_stochastic(), push_sum=True)
    n, d = sched.n, 3
    q = Quadratic(d=d, n=n, seed=12)
    x0 = torch.randn(n, d, generator=rng(1, "x0"), dtype=F64)
    ref = Reference(sched, ["fast"] * n, x0, q, lambda p: torch.optim.SGD(p, lr=0.0))
    tr = ref.run(300)
    avg = x0.mean(dim=0)
    assert (tr.X[300] - avg).abs().max() <= 1e-10
    assert (ref.numerators - avg).abs().max() > 1e-2  # the raw numerators are biased
    assert_close(tr.y[-1], avg)  # sum-preserving: the mean numerator never moves
    assert_close(tr.weights.sum(dim=1), torch.full((301,), float(n)))
    assert tr.consensus[-1] <= 1e-9


def test_consensus_decays_at_the_ring_rate():
    n, d = 8, 4
    sched = Schedule.static(ring_matrix(n))
    rate = sched.consensus_rate()
    assert abs(rate - (1 / 3 + 2 / 3 * np.cos(2 * np.pi / n))) < 1e-12
    q = Quadratic(d=d, n=n, seed=13)
    x0 = torch.randn(n, d, generator=rng(2, "x0"), dtype=F64)
    tr = simulate(sched, ["fast"] * n, x0, q, lambda p: torch.optim.SGD(p, lr=0.0), 60)
    ratio = (tr.consensus[60] / tr.consensus[20]).item()
    assert abs(ratio / rate**40 - 1) < 1e-6
    assert (tr.consensus[1:] <= tr.consensus[:-1] * (1 + 1e-12)).all()


# -- base-optimizer buffers at a slow step -----------------------------------------------------------------


@pytest.mark.parametrize("vectorized", [False, True])
def test_buffers_keep_reset_average(vectorized):
    tau = 3
    q = Quadratic(d=4, n=4, seed=14, noise=0.5)
    roles = ["fast"] * 3 + ["slow"]

    def make(buffers):
        return Reference(
            Schedule.static(block(W3)),
            roles,
            q.initial(),
            q,
            adam(),
            optimizer_state=buffers,
            slow_momentum=SlowMomentum(alpha=0.5, beta=0.3, tau=tau),
            vectorized=vectorized,
        )

    refs = {b: make(b) for b in ("keep", "reset", "average")}
    for _ in range(tau - 1):  # before the slow step every variant is the same
        for r in refs.values():
            r.step()
    for i in range(3):
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close(refs["average"].optimizer_state(i)[key], refs["keep"].optimizer_state(i)[key])
    for r in refs.values():
        r.step()  # the slow step
        assert r.vectorized is vectorized
    for r in refs.values():  # buffers never change the trajectory up to and including the slow step
        assert_close(r.X, refs["keep"].X)
    keep = [refs["keep"].optimizer_state(i) for i in range(3)]
    assert (keep[0]["exp_avg"] - keep[1]["exp_avg"]).abs().max() > 1e-6
    for i in range(3):
        st = refs["average"].optimizer_state(i)
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close(st[key], torch.stack([s[key] for s in keep]).mean(dim=0))
        assert float(st["step"]) == tau  # step counters are kept
        assert refs["reset"].optimizer_state(i) == {}
    assert refs["average"].optimizer_state(3) == {}
    refs["reset"].step()
    assert float(refs["reset"].optimizer_state(0)["step"]) == 1


def test_buffers_follow_a_schedule_sync_with_slow_agents():
    q = Quadratic(d=3, n=2, seed=15, noise=0.1)
    ref = Reference(
        lookahead_schedule(0.5, 2), ["fast", "slow"], q.initial(), q, sgd_momentum(), optimizer_state="reset"
    )
    ref.step()
    assert "momentum_buffer" in ref.optimizer_state(0)
    ref.step()  # P_1 = a 1^T mixes the slow agent with the fast one: a slow step
    assert ref.optimizer_state(0) == {}


# -- gradient mixing -----------------------------------------------------------------------------------------


def test_grad_mixing_average_on_complete_graph_is_one_model_with_mean_gradient():
    n, K = 4, 12
    prob = tiny_regression(n, seed=16)
    J = np.full((n, n), 1.0 / n)
    tr = simulate(Schedule.static(J), ["fast"] * n, prob.x0, prob, adam(0.01), K, grad_mixing="average", record_every=1)
    x = prob.x0.clone()
    opt = adam(0.01)([x])
    for k in range(K):
        x.grad = torch.stack([prob.loss_and_grad(i, k, x)[1] for i in range(n)]).mean(dim=0)
        opt.step()
        assert_close(tr.X[k + 1], x.expand(n, -1))


# -- vectorized path == per-agent path ------------------------------------------------------------------------

VEC_OPTIMIZERS = {
    "sgd_nesterov_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam": adam(),
    "adamw_amsgrad": lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.1, amsgrad=True),
}


def _vec_cases():
    ring40 = ring_matrix(40)  # density 3/40 < 0.1: sparse mixing
    la = lookahead_matrix(0.5)
    ring8_slow = np.eye(9)
    ring8_slow[:8, :8] = ring_matrix(8)
    sync = np.full((9, 9), 0.0)
    sync[:, :] = np.outer(np.r_[np.full(8, 0.5 / 8), 0.5], np.ones(9))
    return {
        "ring40_sparse": (Schedule.static(ring40), ["fast"] * 39 + ["slow"], {}),
        "ring8_slow_sync_average": (
            Schedule([Phase(ring8_slow, 2), Phase(sync, 1)]),
            ["fast"] * 8 + ["slow"],
            dict(optimizer_state="average"),
        ),
        "push_sum_slowmo_reset": (
            Schedule.static(directed_row_stochastic(), push_sum=True),
            ["fast"] * 5,
            dict(slow_momentum=SlowMomentum(0.7, 0.5, 4), optimizer_state="reset"),
        ),
        "slowmo_average_gradmix": (
            Schedule.static(block(W3, slow=2)),
            ["fast"] * 3 + ["slow"] * 2,
            dict(slow_momentum=SlowMomentum(0.6, 0.4, 3), optimizer_state="average", grad_mixing="average"),
        ),
        "lookahead": (Schedule([Phase(np.eye(2), 3), Phase(la, 1)]), ["fast", "slow"], {}),
    }


@pytest.mark.parametrize("case", list(_vec_cases()))
@pytest.mark.parametrize("opt", list(VEC_OPTIMIZERS))
def test_vectorized_equals_per_agent(case, opt):
    sched, roles, kw = _vec_cases()[case]
    n, K = sched.n, 13
    q = Quadratic(d=6, n=n, seed=17, noise=0.3)
    x0 = q.initial() if "slow_momentum" in kw else torch.randn(n, 6, generator=rng(3, "x0"), dtype=F64)
    runs = {}
    for vec in (False, True):
        ref = Reference(sched, roles, x0, q, VEC_OPTIMIZERS[opt], vectorized=vec, record_every=1, **kw)
        assert ref.vectorized is vec
        runs[vec] = ref.run(K)
    if case == "ring40_sparse":
        assert ref._phases[0][0].layout == torch.sparse_coo
    for k in range(K + 1):
        assert_close(runs[True].X[k], runs[False].X[k])
    assert_close(runs[True].y, runs[False].y)
    assert torch.equal(torch.isnan(runs[True].loss), torch.isnan(runs[False].loss))
    assert_close(runs[True].loss.nan_to_num(), runs[False].loss.nan_to_num())


class PerAgentOnly:
    """An objective with loss_and_grad only."""

    def __init__(self, inner):
        self.loss_and_grad = inner.loss_and_grad


def test_vectorized_auto_falls_back_for_unequal_hyperparameters():
    q = Quadratic(d=4, n=3, seed=18)
    lrs = iter([0.1, 0.2, 0.3, 0.4])
    factory = lambda p: torch.optim.SGD(p, lr=next(lrs))  # noqa: E731
    ref = Reference(Schedule.static(ring_matrix(3)), ["fast"] * 3, q.initial(), q, factory)
    assert not ref.vectorized
    assert [o.param_groups[0]["lr"] for o in ref.optimizers] == [0.1, 0.2, 0.3]
    lrs = iter([0.1, 0.2, 0.3])
    with pytest.raises(ConfigError, match="vectorized: .*different hyper-parameters"):
        Reference(Schedule.static(ring_matrix(3)), ["fast"] * 3, q.initial(), q, factory, vectorized=True)
    for factory, why in [
        (lambda p: torch.optim.RMSprop(p, lr=0.1), "SGD, Adam, AdamW"),
        (lambda p: torch.optim.SGD(p, lr=0.1 * len(p[0])), "stacked"),
    ]:
        ref = Reference(Schedule.static(ring_matrix(3)), ["fast"] * 3, q.initial(), q, factory)
        assert not ref.vectorized and len(ref.optimizers) == 3
        with pytest.raises(ConfigError, match=why):
            Reference(Schedule.static(ring_matrix(3)), ["fast"] * 3, q.initial(), q, factory, vectorized=True)
    with pytest.raises(ConfigError, match="batched_grad"):
        Reference(Schedule.static(ring_matrix(3)), ["fast"] * 3, q.initial(), PerAgentOnly(q), adam(), vectorized=True)
    prob = tiny_regression(2)  # batched_grad is a loop over agents, the optimizer and mixing are vectorized
    assert Reference(Schedule.static(ring_matrix(2)), ["fast"] * 2, prob.x0, prob, adam()).vectorized


# -- recording ------------------------------------------------------------------------------------------------


def test_recording_only_at_requested_steps():
    q = Quadratic(d=3, n=2, seed=19)
    sched = lookahead_schedule(0.5, 2)
    make = lambda **kw: Reference(sched, ["fast", "slow"], q.initial(), q, sgd_momentum(), **kw)  # noqa: E731
    assert sorted(make(record_every=3).run(10).X) == [0, 3, 6, 9, 10]
    assert sorted(make(record_steps=[2, 5, 40]).run(10).X) == [2, 5, 10]
    ref = make(record_every=4, record_steps=[13])
    assert sorted(ref.run(10).X) == [0, 4, 8, 10]
    tr = ref.run(5)
    assert tr.start == 10 and sorted(tr.X) == [12, 13, 15]
    assert tr.y.shape == (6, 3) and tr.loss.shape == (5, 2) and tr.consensus.shape == (6,)
    assert tr.weights is None
    assert_close(tr.X[15], ref.X)
    assert sorted(make().run(7).X) == [7]


# -- validation -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(roles=["fast"]), "roles"),
        (dict(roles=["fast", "lazy"]), "roles[1]"),
        (dict(roles=["slow", "slow"]), "roles"),
        (dict(x0=torch.zeros(3, 4)), "x0"),
        (dict(x0=torch.zeros(0)), "x0"),
        (dict(x0=torch.tensor([0.0, float("nan")])), "x0"),
        (dict(optimizer_state="mean"), "optimizer_state"),
        (dict(grad_mixing="sum"), "grad_mixing"),
        (dict(vectorized="yes"), "vectorized"),
        (dict(record_every=0), "record_every"),
        (dict(record_steps=[-1]), "record_steps"),
        (dict(slow_momentum=(0.5, 0.5, 2)), "slow_momentum"),
        (dict(optimizer_factory=lambda p: None), "optimizer_factory"),
        (dict(objective=object()), "objective"),
        (dict(schedule=np.eye(2)), "schedule"),
    ],
)
def test_invalid_arguments_raise_config_error(kw, name):
    q = Quadratic(d=2, n=2, seed=0)
    args = dict(
        schedule=lookahead_schedule(0.5, 2),
        roles=["fast", "slow"],
        x0=torch.zeros(2),
        objective=q,
        optimizer_factory=sgd_momentum(),
    )
    args.update(kw)
    with pytest.raises(ConfigError, match=name.replace("[", r"\[")):
        Reference(
            args.pop("schedule"),
            args.pop("roles"),
            args.pop("x0"),
            args.pop("objective"),
            args.pop("optimizer_factory"),
            **args,
        )


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=1.5), "alpha"),
        (dict(beta=1.0), "beta"),
        (dict(beta=-0.1), "beta"),
        (dict(tau=0), "tau"),
        (dict(tau=2.0), "tau"),
    ],
)
def test_slow_momentum_fields_are_validated(kw, name):
    with pytest.raises(ConfigError, match=f"slow_momentum.{name} must .*{list(kw.values())[0]!r}"):
        SlowMomentum(**kw)


def test_slow_momentum_alpha_above_one_only_on_request_as_in_slowmo():
    assert SlowMomentum(alpha=1.5, beta=0.5, tau=2, max_alpha=2.0).alpha == 1.5
    with pytest.raises(ConfigError, match=r"slow_momentum.alpha must lie in \(0, 2\], got 2.5"):
        SlowMomentum(alpha=2.5, max_alpha=2.0)


def test_slow_momentum_needs_positive_learning_rate():
    q = Quadratic(d=2, n=2, seed=0)
    ref = Reference(
        Schedule.static(np.eye(2)),
        ["fast", "slow"],
        torch.zeros(2),
        q,
        lambda p: torch.optim.SGD(p, lr=0.0),
        slow_momentum=SlowMomentum(0.5, 0.5, 1),
    )
    with pytest.raises(ConfigError, match="lr=0.0"):
        ref.step()


# -- problems: reproducible streams ------------------------------------------------------------------------------


def test_streams_do_not_depend_on_call_order():
    assert stream_seed(3, "noise", 1, 2) == stream_seed(3, "noise", 1, 2)
    assert len({stream_seed(3, "noise", i, k) for i in range(4) for k in range(4)}) == 16
    q1, q2 = Quadratic(d=5, n=3, seed=20, noise=1.0), Quadratic(d=5, n=3, seed=20, noise=1.0)
    x = torch.randn(3, 5, generator=rng(0, "t"), dtype=F64)
    fwd = [q1.loss_and_grad(i, k, x[i])[1] for k in range(3) for i in range(3)]
    bwd = {(i, k): q2.loss_and_grad(i, k, x[i])[1] for k in reversed(range(3)) for i in reversed(range(3))}
    for (k, i), g in zip(itertools.product(range(3), range(3)), fwd):
        assert torch.equal(g, bwd[(i, k)])
    loss, G = q1.batched_grad(2, x[[2, 0]], [2, 0])
    assert torch.equal(G[0], bwd[(2, 2)]) and torch.equal(G[1], bwd[(0, 2)])
    assert_close(loss[1], q1.loss_and_grad(0, 2, x[0])[0])
    p1, p2 = tiny_regression(3, seed=21), tiny_regression(3, seed=21)
    assert torch.equal(p1.x0, p2.x0) and p1.d == 321
    b = p2.data_fn(2, 7)
    assert torch.equal(p1.data_fn(2, 7)[0], b[0]) and not torch.equal(p1.data_fn(1, 7)[0], b[0])


def test_former_names_still_work_with_a_deprecation_warning():
    from lookahead_dist.reference import problems

    with pytest.warns(DeprecationWarning, match="call rng"):
        g = problems.generator(0, "t")
    assert torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=rng(0, "t")))
    q = Quadratic(d=2, n=2, seed=0)
    args = (lookahead_schedule(0.5, 2), ["fast", "slow"], torch.zeros(2), q, sgd_momentum())
    with pytest.warns(DeprecationWarning, match="optimizer_state="):
        ref = Reference(*args, buffers="reset")
    assert ref.optimizer_state_policy == "reset"
    with pytest.warns(DeprecationWarning):
        assert ref.buffers == "reset"
    with pytest.raises(ConfigError, match="disagree"), pytest.warns(DeprecationWarning):
        Reference(*args, buffers="reset", optimizer_state="average")


def test_module_problem_gradient_matches_autograd_on_the_module():
    prob = tiny_regression(2, seed=22)
    x = prob.x0 + 0.1
    params = unflatten(x, prob.module)
    assert torch.equal(torch.cat([v.reshape(-1) for v in params.values()]), x)
    inputs, targets = prob.data_fn(1, 4)
    module = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).double()
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(params[name])
    loss = torch.nn.functional.mse_loss(module(inputs), targets)
    loss.backward()
    g = torch.cat([p.grad.reshape(-1) for p in module.parameters()])
    l2, g2 = prob.loss_and_grad(1, 4, x)
    assert_close(l2, loss.detach())
    assert_close(g2, g)
    assert torch.equal(flatten_params(module), x)
    assert torch.equal(prob.x0, flatten_params(prob.module))  # the module itself is never changed
    assert isinstance(prob, ModuleProblem)
