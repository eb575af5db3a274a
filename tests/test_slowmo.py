"""SlowMo on spawned gloo ranks against the float64 reference engine and its reductions."""

import copy
import os

import numpy as np
import pytest
import torch

from lookahead_dist.errors import ConfigError
from lookahead_dist.mixing import Phase, Schedule
from lookahead_dist.reference.simulate import Reference, SlowMomentum
from lookahead_dist.testing import workers
from lookahead_dist.testing.local_placement import one_rank_group
from lookahead_dist.testing.spawn import spawn
from lookahead_dist.topology import load

TOL = 1e-10
STEPS = 14
W = 4

CONFIGS = {
    "local": dict(tau=3, alpha=1.0, beta=0.5),
    "local_alpha": dict(tau=4, alpha=0.7, beta=0.6),
    "local_avg_only": dict(tau=3, alpha=1.0, beta=0.0),
    "local_beta0": dict(tau=3, alpha=0.6, beta=0.0),
    "ring": dict(tau=3, alpha=0.8, beta=0.5, base="ring.yaml"),
    "sgp": dict(tau=4, alpha=1.0, beta=0.5, base="one_peer_exponential_push_sum"),
    "sgp_directed": dict(tau=3, alpha=1.0, beta=0.3, base="directed_push_sum.yaml"),
    "sharded": dict(tau=3, alpha=0.8, beta=0.5, shard=True),
    "sharded_sgp": dict(tau=3, alpha=1.0, beta=0.3, base="directed_push_sum.yaml", shard=True),
    "reset": dict(tau=3, alpha=1.0, beta=0.5, optimizer_state="reset"),
    "average": dict(tau=3, alpha=1.0, beta=0.5, optimizer_state="average"),
    "lr_decay": dict(tau=4, alpha=1.0, beta=0.5, lr_decay=0.9),
    "ddp": dict(tau=3, alpha=1.0, beta=0.5, ddp=True),
    "resume": dict(tau=4, alpha=0.8, beta=0.5, base="ring.yaml", resume_at=6),
    "resume_sgp": dict(tau=4, alpha=1.0, beta=0.5, base="directed_push_sum.yaml", resume_at=5, shard=True),
}
SGP_MAPPING = {"name": "sgp", "generator": "one_peer_exponential", "push_sum": True}


def rel_err(a, b):
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


@pytest.fixture(scope="module")
def runs():
    configs = copy.deepcopy(CONFIGS)
    configs["sgp"]["base"] = SGP_MAPPING
    return spawn(workers.slowmo_configs, W, configs, STEPS, timeout=400)


def base_schedule(cfg):
    base = cfg.get("base")
    if base is None:
        return Schedule([np.eye(W)], name="local")
    if base == "one_peer_exponential_push_sum":
        return load(SGP_MAPPING, world_size=W).schedule
    return load(os.path.join(workers.TOPOLOGIES, base), world_size=W).schedule


def reference_hist(cfg, steps=STEPS, weights=None):
    prob = workers.make_problem(W)
    ref = Reference(
        base_schedule(cfg),
        ["fast"] * W,
        prob.x0,
        prob,
        lambda p: workers.sgd(p, cfg.get("lr", workers.LR)),
        slow_momentum=SlowMomentum(alpha=cfg["alpha"], beta=cfg["beta"], tau=cfg["tau"]),
        optimizer_state=cfg.get("optimizer_state", "keep"),
        grad_mixing="average" if cfg.get("ddp") else None,
    )
    hist = [ref.X.clone()]
    for k in range(steps):
        ref.step()
        if cfg.get("lr_decay"):
            for opt in ref._opts:
                for g in opt.param_groups:
                    g["lr"] = cfg.get("lr", workers.LR) * cfg["lr_decay"] ** (k + 1)
        hist.append(ref.X.clone())
    if weights is not None:
        weights.append(ref.weights)
    return hist


@pytest.mark.dist
@pytest.mark.parametrize("name", [n for n in CONFIGS if "resume" not in n])
def test_slowmo_equals_reference_engine(runs, name):
    cfg = CONFIGS[name]
    hist = reference_hist(cfg)
    worst = max(rel_err(runs[r][name]["hist"][k], hist[k][r]) for r in range(W) for k in range(STEPS + 1))
    assert worst <= TOL, f"{name}: {worst:.3g}"


@pytest.mark.dist
def test_beta_zero_is_the_mixing_engine_matrix_step(runs):
    """beta = 0: the slow step is the matrix (1 - alpha) z + alpha x_bar applied to every agent, on the reference."""
    cfg = CONFIGS["local_beta0"]
    tau, alpha = cfg["tau"], cfg["alpha"]
    # agents 0..W-1 fast, agent W the slow copy z; identity, then the SlowMo matrix at the sync
    n = W + 1
    sync = np.zeros((n, n))
    sync[:W, :] = alpha / W
    sync[W, :] = 1 - alpha
    sched = Schedule([Phase(np.eye(n), tau - 1), Phase(sync, 1)])
    prob = workers.make_problem(W)
    objective = prob
    ref = Reference(sched, ["fast"] * W + ["slow"], prob.x0, _PadAgents(objective, W), workers.sgd, record_every=1)
    trace = ref.run(STEPS)
    for r in range(W):
        for k in range(STEPS + 1):
            assert rel_err(runs[r]["local_beta0"]["hist"][k], trace.X[k][r]) <= TOL


class _PadAgents:
    """The W-agent problem seen by a schedule with one extra (slow) agent."""

    def __init__(self, prob, w):
        self.prob, self.w = prob, w

    def loss_and_grad(self, agent, step, x):
        return self.prob.loss_and_grad(agent, step, x)


@pytest.mark.dist
def test_alpha_one_beta_zero_is_local_sgd_with_exact_average(runs):
    """alpha = 1, beta = 0 with a local base: local SGD, i.e. an exact average every tau steps."""
    tau = CONFIGS["local_avg_only"]["tau"]
    sched = Schedule([Phase(np.eye(W), tau - 1), Phase(np.full((W, W), 1.0 / W), 1)])
    prob = workers.make_problem(W)
    trace = Reference(sched, ["fast"] * W, prob.x0, prob, workers.sgd, record_every=1).run(STEPS)
    for r in range(W):
        for k in range(STEPS + 1):
            assert rel_err(runs[r]["local_avg_only"]["hist"][k], trace.X[k][r]) <= TOL


@pytest.mark.dist
def test_sharded_equals_unsharded_to_1e12(runs):
    """Sharding the slow copy and momentum (reduce-scatter, update, all-gather) keeps the trajectory."""
    hist = reference_hist(CONFIGS["sharded"])
    for r in range(W):
        assert rel_err(runs[r]["sharded"]["hist"][-1], hist[-1][r]) <= 1e-12


@pytest.mark.dist
@pytest.mark.parametrize("name", ["resume", "resume_sgp"])
def test_resume_mid_window_is_bitwise(runs, name):
    for r in range(W):
        assert torch.equal(runs[r][name]["full"], runs[r][name]["resumed"]), (name, r)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(tau=0), "tau must be an integer >= 1, got 0"),
        (dict(tau=2.5), "tau must be an integer >= 1, got 2.5"),
        (dict(alpha=0.0), r"alpha must lie in \(0, 1\], got 0.0"),
        (dict(alpha=1.5), r"alpha must lie in \(0, 1\], got 1.5 \(pass max_alpha"),
        (dict(beta=1.0), r"beta must lie in \[0, 1\), got 1.0"),
        (dict(beta=-0.1), r"beta must lie in \[0, 1\), got -0.1"),
        (dict(optimizer_state="sometimes"), "optimizer_state must be one of"),
    ],
)
def test_invalid_settings_are_clear_errors(kw, match):
    from lookahead_dist.slowmo import SlowMo

    model = torch.nn.Linear(2, 1)
    with pytest.raises(ConfigError, match=match):
        SlowMo(torch.optim.SGD(model.parameters(), lr=0.1), model, **kw)


@pytest.mark.dist
def test_lr_differing_across_workers_is_an_error():
    results = spawn(workers.slowmo_lr_mismatch, 2, allow_errors=True)
    for status, text in results:
        assert status == "error" and "learning rate differs across workers" in text and "[[0.1], [0.2]]" in text


@pytest.fixture()
def single_rank_group():
    with one_rank_group("gloo"):
        yield


def test_one_worker_beta_zero_is_lookahead(single_rank_group):
    from lookahead_dist.lookahead import Lookahead
    from lookahead_dist.slowmo import SlowMo

    prob = workers.make_problem(1)
    m1, m2 = copy.deepcopy(prob.module), copy.deepcopy(prob.module)
    la = Lookahead(torch.optim.Adam(m1.parameters(), lr=0.01), tau=4, alpha=0.6)
    sm = SlowMo(torch.optim.Adam(m2.parameters(), lr=0.01), m2, tau=4, alpha=0.6, beta=0.0)
    for k in range(13):
        for model, opt in ((m1, la), (m2, sm)):
            opt.zero_grad()
            x, y = prob.data_fn(0, k)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        assert rel_err(workers.flat_model(m2), workers.flat_model(m1)) <= 1e-12
    sm.comm.close()


def test_model_buffers_take_the_average_and_no_slow_momentum(single_rank_group):
    from lookahead_dist.slowmo import SlowMo

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 1))
    opt = SlowMo(torch.optim.SGD(model.parameters(), lr=0.1), model, tau=2, alpha=1.0, beta=0.9)
    bn = model[1]
    for k in range(12):
        opt.zero_grad()
        x = torch.randn(16, 4) * (1.0 + k)  # batch statistics that keep changing
        model(x).pow(2).mean().backward()
        stats = bn.running_mean.clone(), bn.running_var.clone()
        opt.step()
        # one worker: x_bar is its own value; momentum on the statistics would move them off it
        assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1]), k
    assert float(opt.momentum[0].abs().max()) > 0  # the parameters did take slow-momentum steps
    opt.comm.close()


def test_moving_the_model_after_wrapping_is_a_clear_error(single_rank_group):
    from lookahead_dist.slowmo import SlowMo

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    opt = SlowMo(torch.optim.SGD(model.parameters(), lr=0.1), model, tau=2)
    model.double()  # replaces every parameter's data: they no longer live in the flat buffer
    model(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
    with pytest.raises(ConfigError, match=r"tensor '0.weight' no longer lives in the flat torch.float32 buffer"):
        opt.step()
    opt.comm.close()


@pytest.mark.dist
@pytest.mark.parametrize("name", ["local", "ring", "sgp_directed", "sharded_sgp"])
def test_finalize_leaves_every_worker_the_exact_average(runs, name):
    """Push-sum: sum of numerators z_i w_i over the sum of weights; otherwise the plain mean."""
    weights = []
    Z = reference_hist(CONFIGS[name], weights=weights)[-1]
    w = weights[0] if weights[0] is not None else torch.ones(W, dtype=torch.float64)
    expect = (Z * w[:, None]).sum(0) / w.sum()
    for r in range(W):
        assert rel_err(runs[r][name]["finalized"], expect) <= TOL
