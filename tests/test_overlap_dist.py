"""Overlapped communication on really spawned gloo ranks against the float64 reference engine.

The overlapped wrappers mix in combine-then-adapt order, X_{k+1} = X_k P_k - G_k, with
x_k's exchange in flight behind the forward and backward at x_k; the reference engine's
``order="combine_then_adapt"`` (and ``overlap_slow=True`` for SlowMo's overlapped slow
step) is the oracle, to 1e-10 in float64. One 4-rank group runs most checks.
"""

import os

import numpy as np
import pytest
import torch

from lookahead_dist.mixing import Schedule
from lookahead_dist.reference.simulate import Reference, SlowMomentum
from lookahead_dist.testing import workers
from lookahead_dist.testing.spawn import spawn
from lookahead_dist.testing.verify import consensus_distances, measured_rate
from lookahead_dist.topology import load
from tests.test_engine_dist import FOUR  # every shipped 4-rank topology, the blocking suite's list

pytestmark = pytest.mark.dist

TOL = 1e-10
STEPS = 10
SLOWMO_STEPS = 13
W = 4
CTA = "combine_then_adapt"

SLOWMO = {
    "ring": dict(tau=3, alpha=0.8, beta=0.5, base="ring.yaml", overlap=True),
    "sgp": dict(tau=4, alpha=1.0, beta=0.5, base="directed_push_sum.yaml", overlap=True),
    "ring_slow": dict(tau=3, alpha=0.8, beta=0.5, base="ring.yaml", overlap=True, overlap_slow=True),
    "sgp_slow": dict(tau=3, alpha=1.0, beta=0.3, base="directed_push_sum.yaml", overlap=True, overlap_slow=True),
    "local_slow": dict(tau=3, alpha=1.0, beta=0.5, overlap_slow=True),
    "local_slow_tau1": dict(tau=1, alpha=0.7, beta=0.2, overlap_slow=True),
    "blocking_gossip_slow": dict(tau=4, alpha=1.0, beta=0.5, base="ring.yaml", overlap_slow=True),
    "resume": dict(tau=3, alpha=0.8, beta=0.5, base="ring.yaml", overlap=True, overlap_slow=True, resume_at=6),
    "resume_sgp": dict(tau=4, alpha=1.0, beta=0.5, base="directed_push_sum.yaml", overlap=True, resume_at=5),
}


def rel_err(a, b):
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def topo_of(name, world=W):
    return load(os.path.join(workers.TOPOLOGIES, name), world_size=world)


def check_decentralized(topo, per_rank, steps=STEPS, key=None):
    """Every fast agent at every step, and every local agent at the end, against the reference in CTA order."""
    prob = workers.make_problem(topo.n)
    ref = Reference(topo.schedule, topo.roles, prob.x0, prob, lambda p: workers.sgd(p), record_every=1, order=CTA)
    trace = ref.run(steps)
    worst = 0.0
    for res in per_rank:
        r = res[key] if key else res
        if r["agent"] is not None:
            for k, x in enumerate(r["hist"]):
                worst = max(worst, rel_err(x, trace.X[k][r["agent"]]))
        for a, bufs in r["agents"].items():
            x = bufs[0][:-1] if topo.push_sum else bufs[0]
            worst = max(worst, rel_err(x, trace.X[steps][a]))
    assert worst <= TOL, f"{topo.name}: largest deviation from the combine-then-adapt reference {worst:.3g}"
    # and it is not the adapt-then-combine trajectory (the order matters when P_k is not the identity)
    ata = Reference(topo.schedule, topo.roles, prob.x0, prob, lambda p: workers.sgd(p), record_every=1).run(steps)
    assert float((ata.X[steps] - trace.X[steps]).abs().max()) > 1e-8


@pytest.fixture(scope="module")
def suite():
    return spawn(workers.overlap_suite, W, FOUR, STEPS, SLOWMO, SLOWMO_STEPS, timeout=500)


@pytest.mark.parametrize("name", FOUR)
def test_overlapped_four_ranks_equal_reference_in_combine_then_adapt_order(suite, name):
    check_decentralized(topo_of(name), [r["train"][name] for r in suite])


@pytest.mark.parametrize("name", FOUR)
def test_lr_zero_overlapped_equals_blocking_and_reaches_consensus_at_predicted_rate(suite, name):
    topo = topo_of(name)
    for r in suite:
        ov, bl = r["still"][name], r["still_blocking"][name]
        for x, y in zip(ov["agent_hist"], bl["agent_hist"]):
            for a in x:
                assert torch.equal(x[a], y[a]), f"{name}: agent {a} overlapped differs from blocking at lr 0"
    dist = consensus_distances(topo, [{"c": r["still"][name]} for r in suite], key="c")
    predicted = topo.schedule.consensus_rate(per_step=True)
    seen = measured_rate(dist, topo.schedule.period)
    assert dist[-1] < dist[0]
    assert seen <= predicted * 1.1 + 1e-9, f"{name}: measured rate {seen:.4f} vs predicted {predicted:.4f}"


def slowmo_reference(cfg, steps=SLOWMO_STEPS):
    base = cfg.get("base")
    sched = Schedule([np.eye(W)], name="local") if base is None else topo_of(base).schedule
    prob = workers.make_problem(W)
    ref = Reference(
        sched,
        ["fast"] * W,
        prob.x0,
        prob,
        lambda p: workers.sgd(p),
        slow_momentum=SlowMomentum(alpha=cfg["alpha"], beta=cfg["beta"], tau=cfg["tau"]),
        order=CTA if cfg.get("overlap") else "adapt_then_combine",
        overlap_slow=bool(cfg.get("overlap_slow")),
    )
    hist = [ref.X.clone()]
    for _ in range(steps):
        ref.step()
        hist.append(ref.X.clone())
    return hist


@pytest.mark.parametrize("name", [n for n, c in SLOWMO.items() if c.get("resume_at") is None])
def test_overlapped_slowmo_equals_reference(suite, name):
    cfg = SLOWMO[name]
    hist = slowmo_reference(cfg)
    worst = max(
        rel_err(x, hist[k][rank]) for rank, r in enumerate(suite) for k, x in enumerate(r["slowmo"][name]["hist"])
    )
    assert worst <= TOL, f"{name}: largest deviation {worst:.3g}"
    # the overlapped slow step is not the blocking one
    if cfg.get("overlap_slow"):
        blocking = slowmo_reference({**cfg, "overlap_slow": False})
        assert float((blocking[-1] - hist[-1]).abs().max()) > 1e-8


@pytest.mark.parametrize("name", ["resume", "resume_sgp"])
def test_overlapped_resume_mid_run_is_bitwise(suite, name):
    cfg = SLOWMO[name]
    start = cfg["resume_at"]
    for r in suite:
        full, resumed = r["slowmo"][name]["full"], r["slowmo"][name]["resumed"]
        assert len(resumed) == SLOWMO_STEPS - start + 1
        for k, x in enumerate(resumed):
            assert torch.equal(x, full[start + k]), f"{name}: step {start + k} differs after the resume"
    hist = slowmo_reference(cfg)
    assert (
        max(rel_err(x, hist[k][rank]) for rank, r in enumerate(suite) for k, x in enumerate(r["slowmo"][name]["full"]))
        <= TOL
    )


def test_batchnorm_statistics_keep_forward_updates_under_overlap(suite):
    # lr 0, complete graph, rank r's running mean starts at r. Each step sends the mean m_r, forward moves it
    # by 0.1 (b - m_r) toward the batch mean b (the same on every rank), and the step writes
    # average(m) + 0.1 (b - m_r): the ranks' spread shrinks by -0.1 per step, m_r - m_0 = r (-0.1)^k.
    # Were forward's update dropped, the means would never move after the first average.
    means = [r["bn"] for r in suite]
    for k in range(1, 4):
        assert not torch.equal(means[0][k], means[0][k - 1]), f"step {k}: the running mean did not move"
        for rank, m in enumerate(means):
            expected = torch.full_like(m[k], rank * (-0.1) ** k)
            assert torch.allclose(m[k] - means[0][k], expected, atol=1e-5), (k, rank, m[k] - means[0][k])


def test_in_place_change_while_in_flight_is_an_error(suite):
    for r in suite:
        assert r["inplace"].startswith("InFlightError"), r["inplace"]
        assert "changed in place" in r["inplace"] and "step 1" in r["inplace"]
        assert r["after_finalize_step"] == 2
        assert r["after_drop_step"] == 2


@pytest.mark.parametrize(
    "world, name",
    [(9, "torus.yaml"), (2, "two_agent.yaml"), (5, "slow_agent_own_rank.yaml")],
)
def test_overlapped_other_world_sizes_equal_reference(world, name):
    per_rank = spawn(workers.many_topologies, world, [name], STEPS, workers.LR, 0.0, True, timeout=300)
    topo = topo_of(name, world)
    check_decentralized(topo, per_rank, key=name)
    if name != "torus.yaml":  # a rank without a fast agent took part, overlapped
        assert any(r[name]["agent"] is None for r in per_rank)
