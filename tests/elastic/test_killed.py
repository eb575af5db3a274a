"""Elastic runs whose members are really killed (SIGKILL) on gloo: the survivors go on, agree, and stay exact.

Each trial starts 8 (or 4) member processes with the store in the test process (as
the supervisor holds it), kills one or two of them at a step (or inside a slow
step's all-reduce), and checks that every survivor ends (no hang), in the same
generation, with the exact average of the survivors; D-PSGD trials are compared
with the reference engine restarted on the survivors' states with the re-planned
schedule, to 1e-10 in float64.
"""

from __future__ import annotations

import random

import pytest
import torch

from lookahead_dist.mixing import Schedule
from lookahead_dist.reference.simulate import Reference, SlowMomentum
from lookahead_dist.regroup import replan
from lookahead_dist.testing.elastic_workers import run_members, trial
from lookahead_dist.testing.verify import LR, SEED, make_problem, sgd

pytestmark = pytest.mark.dist

TOL = 1e-10


class _Renamed:
    """The tiny regression seen by the new generation: agent i is member ``members[i]``, step t is ``offset + t``."""

    def __init__(self, prob, members, offset):
        self.prob, self.members, self.offset = prob, members, offset

    def loss_and_grad(self, agent, step, x):
        return self.prob.loss_and_grad(self.members[agent], self.offset + step, x)


def survivors(results):
    ok = {m: v for (m, _), (status, v) in results.items() if status == "ok"}
    errors = {k: v for k, (status, v) in results.items() if status == "error"}
    assert not errors, errors
    return ok


def check_consistent(ok, steps, lost):
    views = {tuple(v["view"]["members"]) for v in ok.values()}
    assert len(views) == 1, views
    (members,) = views
    assert set(members) == set(ok) and not set(members) & set(lost)
    # the consensus model is the exact average of the survivors' models at the end
    mean = torch.stack([ok[m]["trace"][steps] for m in members]).mean(0)
    for m in members:
        assert (ok[m]["final"] - mean).abs().max() <= 1e-12 * max(1.0, float(mean.abs().max()))
    for v in ok.values():
        assert sorted({x for e in v["events"] for x in e["lost"]}) == sorted(lost)
    return members


def check_reference(ok, cfg, world):
    """The run after the last change equals the reference engine restarted on the survivors' states."""
    last = {m: v["restarts"][-1] for m, v in ok.items()}
    assert len({(r["generation"], r["step"], tuple(r["members"])) for r in last.values()}) == 1
    r0 = next(iter(last.values()))
    s, members = r0["step"], r0["members"]
    topo = replan(cfg["topology"], len(members))
    period = topo.schedule.period
    rotated = Schedule.cyclic([topo.schedule.matrix((s + i) % period) for i in range(period)])
    prob = make_problem(world, cfg.get("seed", SEED))
    x0 = torch.stack([last[m]["x"] for m in members])
    lr = cfg.get("lr", LR)
    ref = Reference(
        rotated, ["fast"] * len(members), x0, _Renamed(prob, members, s), lambda p: sgd(p, lr), vectorized=False
    )
    for i, m in enumerate(members):
        if last[m]["momentum"] is not None:
            opt = ref.optimizers[i]
            opt.state[opt.param_groups[0]["params"][0]]["momentum_buffer"] = last[m]["momentum"].clone()
    worst = 0.0
    for t in range(1, cfg["steps"] - s + 1):
        ref.step()
        scale = max(1.0, float(ref.X.abs().max()))
        for i, m in enumerate(members):
            worst = max(worst, float((ok[m]["trace"][s + t] - ref.X[i]).abs().max()) / scale)
    assert worst <= TOL, worst
    return worst


def test_dpsgd_two_deaths_at_once_match_the_reference():
    cfg = dict(algo="dpsgd", topology="one_peer_exponential", steps=12, kills={3: 5, 6: 5})
    results, killed = run_members(trial, 8, cfg)
    ok = survivors(results)
    check_consistent(ok, cfg["steps"], [3, 6])
    check_reference(ok, cfg, 8)
    for v in ok.values():
        (e,) = v["events"]
        assert e["world_size"] == 6 and e["to_step"] == 5 and e["stall_s"] < 5.0


def _trial_cfg(seed):
    rng = random.Random(seed)
    algo = "dpsgd" if seed % 2 == 0 else "slowmo"
    victims = rng.sample(range(8), rng.choice([1, 2]))
    steps = 10
    kills = {v: rng.randrange(1, steps - 1) for v in victims}
    cfg = dict(algo=algo, steps=steps, kills=kills, seed=seed)
    if algo == "dpsgd":
        cfg["topology"] = "one_peer_exponential"
    else:
        cfg.update(topology="ring", tau=3, alpha=1.0, beta=0.5)
    return cfg


@pytest.mark.parametrize("seed", range(10))
def test_random_kills_end_without_a_hang(seed):
    cfg = _trial_cfg(seed)
    results, killed = run_members(trial, 8, cfg, timeout=240)
    ok = survivors(results)
    assert set(killed) == set(cfg["kills"])
    check_consistent(ok, cfg["steps"], sorted(cfg["kills"]))
    if cfg["algo"] == "dpsgd":
        check_reference(ok, cfg, 8)


def test_slowmo_member_killed_inside_the_slow_all_reduce():
    # tau = 3: the slow step of step 5 all-reduces; member 2 enters it first and is killed there
    cfg = dict(algo="slowmo", topology="ring", tau=3, alpha=1.0, beta=0.5, steps=9, in_allreduce=(2, 5))
    results, killed = run_members(trial, 8, cfg, timeout=240)
    ok = survivors(results)
    assert list(killed) == [2]
    check_consistent(ok, cfg["steps"], [2])
    for v in ok.values():
        (e,) = v["events"]
        assert e["to_step"] == 5 and e["world_size"] == 7


def test_death_found_by_heartbeat_alone():
    # no launcher reports the death: the survivors wait until its heartbeat has not moved for dead_after
    cfg = dict(algo="dpsgd", topology="ring", steps=8, kills={1: 3})
    results, _ = run_members(trial, 4, cfg, report_deaths=False, dead_after=2.0)
    ok = survivors(results)
    check_consistent(ok, cfg["steps"], [1])
    check_reference(ok, cfg, 4)
    agree = [v["events"][0]["agree_s"] for v in ok.values()]
    assert 2.0 <= max(agree) < 10.0, agree  # the first to arrive waits out dead_after; the others may find it decided


def test_restarted_member_rejoins_with_a_neighbours_state():
    cfg = dict(algo="slowmo", topology="ring", tau=3, alpha=1.0, beta=0.5, steps=30, kills={2: 4}, step_sleep=0.05)
    cfg["await_rejoin"] = True  # the others go on until it is back, however slowly its process starts
    results, _ = run_members(trial, 4, cfg, restart={2: 1.5}, timeout=240)
    ok = survivors(results)
    assert results[(2, 0)][0] == "dead" and results[(2, 1)][0] == "ok"
    rejoined = results[(2, 1)][1]
    views = {tuple(v["view"]["members"]) for v in ok.values()}
    assert views == {(0, 1, 2, 3)}
    start = rejoined["restarts"][0]
    assert start["step"] % 3 == 0 and start["step"] > 4  # it joined at a slow step, after the others went on
    donor = ok[1]  # the member before it in rank order
    (same,) = [r for r in donor["restarts"] if r["generation"] == start["generation"]]
    assert same["step"] == start["step"] and torch.equal(start["x"], same["x"])
    finals = [v["final"] for v in ok.values()] + [rejoined["final"]]
    assert all(torch.equal(f, finals[0]) for f in finals)
    kinds = [e["reason"] for e in donor["events"]]
    assert kinds == ["failure", "join"]


def test_topology_that_cannot_be_re_planned_stops_every_survivor_with_its_name(tmp_path):
    path = tmp_path / "custom.yaml"
    path.write_text("edges: [[0, 1], [1, 2], [2, 3], [3, 0]]\nundirected: true\n")
    cfg = dict(algo="dpsgd", topology=str(path), steps=6, kills={0: 2})
    results, _ = run_members(trial, 4, cfg)
    for m in (1, 2, 3):
        status, text = results[(m, 0)]
        assert status == "error" and "TopologyError" in text and "custom.yaml" in text, text
        assert "cannot be re-planned for 3 ranks" in text


def test_diloco_outer_and_fragments_go_on_after_a_death():
    # elastic=True SlowMo with an outer Nesterov SGD and 2 fragments over a ring: the outer momentum and each
    # fragment's gamma come back with the survivors' copies, and the consensus is their exact average
    cfg = dict(algo="slowmo", topology="ring", tau=4, outer=True, fragments=2, steps=12, kills={1: 6})
    results, killed = run_members(trial, 4, cfg, timeout=180)
    ok = survivors(results)
    assert list(killed) == [1]
    check_consistent(ok, cfg["steps"], [1])
    for v in ok.values():
        (e,) = v["events"]
        assert e["world_size"] == 3 and e["to_step"] <= 6


@pytest.mark.parametrize("sync_dtype", ["int8", "bfloat16"])
def test_a_compressed_outer_sync_goes_on_after_a_death(sync_dtype):
    # DiLoCo averaging its pseudo-gradient compressed, with error feedback: the chunks of the average each
    # rank owns are cut anew for 3 ranks (their residuals restart), and the survivors still agree exactly
    cfg = dict(algo="slowmo", topology="ring", tau=3, outer=True, sync_dtype=sync_dtype, steps=12, kills={2: 5})
    results, killed = run_members(trial, 4, cfg, timeout=180)
    ok = survivors(results)
    assert list(killed) == [2]
    check_consistent(ok, cfg["steps"], [2])
    for v in ok.values():
        (e,) = v["events"]
        assert e["world_size"] == 3 and e["to_step"] <= 5


def test_slowmo_after_a_death_matches_the_reference_restarted_on_the_survivors():
    # SlowMo over a ring (tau 3, beta 0.5): after the change the survivors' run is the reference engine with
    # slow momentum started at the restart step s from their models, base momenta, slow copy z and momentum u
    cfg = dict(algo="slowmo", topology="ring", tau=3, alpha=1.0, beta=0.5, steps=12, kills={2: 4})
    results, killed = run_members(trial, 4, cfg, timeout=240)
    ok = survivors(results)
    check_consistent(ok, cfg["steps"], [2])
    last = {m: v["restarts"][-1] for m, v in ok.items()}
    r0 = next(iter(last.values()))
    s, members = r0["step"], r0["members"]
    zs = [last[m]["slow"] for m in members]
    us = [last[m]["slow_momentum"] for m in members]
    assert all(torch.equal(z, zs[0]) for z in zs) and all(torch.equal(u, us[0]) for u in us)
    topo = replan(cfg["topology"], len(members))
    prob = make_problem(4, SEED)
    x0 = torch.stack([last[m]["x"] for m in members])
    ref = Reference(
        topo.schedule, ["fast"] * len(members), x0, _Renamed(prob, members, 0), lambda p: sgd(p, LR),
        slow_momentum=SlowMomentum(alpha=cfg["alpha"], beta=cfg["beta"], tau=cfg["tau"]), vectorized=False,
    )  # fmt: skip
    ref._k, ref._gammas = s, [LR]  # a ring's one phase; slow steps at the global steps (k + 1) % tau == 0
    ref._z.copy_(zs[0])
    ref._u.copy_(us[0])
    for i, m in enumerate(members):
        if last[m]["momentum"] is not None:
            opt = ref.optimizers[i]
            opt.state[opt.param_groups[0]["params"][0]]["momentum_buffer"] = last[m]["momentum"].clone()
    worst = 0.0
    for t in range(s + 1, cfg["steps"] + 1):
        ref.step()
        scale = max(1.0, float(ref.X.abs().max()))
        for i, m in enumerate(members):
            worst = max(worst, float((ok[m]["trace"][t] - ref.X[i]).abs().max()) / scale)
    assert worst <= TOL, worst
