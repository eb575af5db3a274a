"""The distributed engine against the float64 reference engine, on really spawned gloo ranks.

One spawned group runs many topologies in turn (starting processes costs
seconds); the parent then replays each with :class:`lookahead_dist.reference.simulate.Reference`
on the same problem, seeds and data, and compares every step.
"""

import os

import numpy as np
import pytest
import torch

from lookahead_dist.reference.simulate import Reference
from lookahead_dist.testing import workers
from lookahead_dist.testing.spawn import spawn
from lookahead_dist.topology import load

pytestmark = pytest.mark.dist

TOL = 1e-10
STEPS = 12


def rel_err(a, b):
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def reference(topo, steps, lr=workers.LR, perturb=0.0):
    prob = workers.make_problem(topo.n)
    x0 = torch.stack([workers.perturbed_start(prob, a, perturb) for a in range(topo.n)]) if perturb else prob.x0
    ref = Reference(topo.schedule, topo.roles, x0, prob, lambda p: workers.sgd(p, lr), record_every=1)
    return ref.run(steps)


def check_against_reference(topo, per_rank, steps, lr=workers.LR, perturb=0.0):
    trace = reference(topo, steps, lr, perturb)
    worst = 0.0
    for res in per_rank:
        a = res["agent"]
        if a is None:
            continue
        for k, x in enumerate(res["hist"]):
            worst = max(worst, rel_err(x, trace.X[k][a]))
    assert worst <= TOL, f"{topo.name}: largest deviation from the reference {worst:.3g}"
    # every local agent (slow ones included) at the end
    for res in per_rank:
        for a, bufs in res["agents"].items():
            x = bufs[0][:-1] if topo.push_sum else bufs[0]  # between steps the model holds z = x / w
            assert rel_err(x, trace.X[steps][a]) <= TOL
    return trace


FOUR = [
    "ring.yaml",
    "hypercube.yaml",
    "exponential.yaml",
    "one_peer_exponential.yaml",
    "time_varying.yaml",
    "directed_push_sum.yaml",
    "hierarchical.yaml",
    "complete.yaml",
    "edges_example.yaml",
]


@pytest.fixture(scope="module")
def four_rank_runs():
    return spawn(workers.many_topologies, 4, FOUR, STEPS, workers.LR)


@pytest.mark.parametrize("name", FOUR)
def test_four_ranks_equal_reference(four_rank_runs, name):
    topo = load(os.path.join(workers.TOPOLOGIES, name), world_size=4)
    per_rank = [r[name] for r in four_rank_runs]
    trace = check_against_reference(topo, per_rank, STEPS)
    # finalize(): every rank holds the exact average of the fast agents
    Z = trace.X[STEPS]
    if topo.push_sum:  # sum of numerators z_i w_i over sum of weights
        w = torch.tensor([r[name]["weight"] for r in four_rank_runs], dtype=torch.float64)
        assert abs(float(w.sum()) - 4.0) < 1e-12  # push-sum preserves the total weight
        expect = torch.stack([Z[r[name]["agent"]] * r[name]["weight"] for r in four_rank_runs]).sum(0) / w.sum()
    else:
        expect = Z.mean(0)
    for r in four_rank_runs:
        assert rel_err(r[name]["finalized"], expect) <= TOL


def test_bytes_sent_are_the_minimum(four_rank_runs):
    """A gossip step sends exactly out-degree x buffer bytes per rank."""
    prob = workers.make_problem(4)
    nbytes = prob.d * 8
    for name in ["ring.yaml", "exponential.yaml", "one_peer_exponential.yaml", "directed_push_sum.yaml"]:
        topo = load(os.path.join(workers.TOPOLOGIES, name), world_size=4)
        extra = 8 if topo.push_sum else 0  # the push-sum weight travels in the same buffer
        for rank, r in enumerate(four_rank_runs):
            expect = 0
            for k in range(STEPS):
                P = topo.schedule.matrix(k)
                out_peers = {topo.placement[j] for j in np.flatnonzero(P[rank]) if topo.placement[j] != rank}
                expect += len(out_peers) * (nbytes + extra)
            assert r[name]["bytes"] == expect, (name, rank)


@pytest.fixture(scope="module")
def lr_zero_runs():
    return spawn(workers.many_topologies, 4, LR_ZERO, 30, 0.0, 1.0)


LR_ZERO = [
    "ring.yaml",
    "hypercube.yaml",
    "exponential.yaml",
    "time_varying.yaml",
    "directed_push_sum.yaml",
    "one_peer_exponential.yaml",
    "hierarchical.yaml",
]


@pytest.mark.parametrize("name", LR_ZERO)
def test_lr_zero_reaches_consensus_at_predicted_rate(lr_zero_runs, name):
    """With learning rate 0 the disagreement shrinks by the schedule's rate (per step, over whole periods)."""
    if True:
        topo = load(os.path.join(workers.TOPOLOGIES, name), world_size=4)
        hist = torch.stack([torch.stack(r[name]["hist"]) for r in lr_zero_runs], dim=1)  # (steps+1, n, d)
        check_against_reference(topo, [r[name] for r in lr_zero_runs], 30, lr=0.0, perturb=1.0)
        # disagreement from the consensus value X a (push-sum: the de-biased models from their limit)
        a = torch.tensor(topo.schedule.invariant_vector(), dtype=torch.float64)
        if topo.push_sum:
            limit = hist[0].mean(0)  # push-sum drives every z_i to the average of the initial values
            dist = (hist - limit).flatten(1).norm(dim=1).numpy()
        else:
            dist = (hist - torch.einsum("kid,i->kd", hist, a)[:, None]).flatten(1).norm(dim=1).numpy()
        rate = topo.schedule.consensus_rate(per_step=True)
        period = topo.schedule.period
        if rate < 1e-6:  # exact averaging in finite time
            assert dist[period] <= 1e-12 * dist[0], (name, dist[: period + 1])
            return
        k1 = 30 - 30 % period
        k0 = k1 - 2 * period
        seen = (dist[k1] / dist[k0]) ** (1.0 / (k1 - k0))
        assert seen == pytest.approx(rate, rel=0.1), (name, seen, rate)


def test_torus_nine_ranks_equals_reference():
    per_rank = spawn(workers.many_topologies, 9, ["torus.yaml"], 8, workers.LR)
    topo = load(os.path.join(workers.TOPOLOGIES, "torus.yaml"), world_size=9)
    check_against_reference(topo, [r["torus.yaml"] for r in per_rank], 8)


def test_two_agent_on_two_ranks_equals_serial_lookahead_and_reference():
    from lookahead_dist.lookahead import Lookahead

    per_rank = spawn(workers.many_topologies, 2, ["two_agent.yaml"], STEPS, workers.LR)
    topo = load(os.path.join(workers.TOPOLOGIES, "two_agent.yaml"), world_size=2)
    runs = [r["two_agent.yaml"] for r in per_rank]
    check_against_reference(topo, runs, STEPS)
    # the serial optimizer on the fast agent's data
    prob = workers.make_problem(2)
    import copy

    model = copy.deepcopy(prob.module)
    opt = Lookahead(workers.sgd(model.parameters()), tau=5, alpha=0.5)
    for k in range(STEPS):
        opt.zero_grad()
        inputs, targets = prob.data_fn(0, k)
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        opt.step()
        assert rel_err(runs[0]["hist"][k + 1], workers.flat_model(model)) <= TOL
    with opt.slow_weights():
        slow_serial = workers.flat_model(model)
    assert rel_err(runs[1]["agents"][1][0], slow_serial) <= TOL


def test_slow_agent_on_its_own_rank_runs_passive_and_equals_reference():
    per_rank = spawn(workers.many_topologies, 5, ["slow_agent_own_rank.yaml"], STEPS, workers.LR)
    topo = load(os.path.join(workers.TOPOLOGIES, "slow_agent_own_rank.yaml"), world_size=5)
    runs = [r["slow_agent_own_rank.yaml"] for r in per_rank]
    # passive rank: its model is the slow agent, which moves only at the syncs ((k + 1) % 4 == 0)
    hist = runs[4]["hist"]
    assert runs[4]["agent"] is None and len(hist) == STEPS + 1
    for k in range(STEPS):
        assert torch.equal(hist[k + 1], hist[k]) == ((k + 1) % 4 != 0), k
    check_against_reference(topo, runs, STEPS)


def test_several_agents_per_rank_hierarchical_equals_reference():
    """8 agents on 4 ranks: 2 nodes x 2 ranks x 2 agents; exact average inside a node, ring between nodes."""
    mapping = {
        "name": "nested",
        "generator": {"type": "hierarchical", "nodes": 2, "per_node": 4},
        "placement": [0, 0, 1, 1, 2, 2, 3, 3],
    }
    per_rank = spawn(workers.several_agents_per_rank, 4, mapping, STEPS, workers.LR)
    from lookahead_dist.topology import from_mapping

    topo = from_mapping(mapping, world_size=4)
    trace = reference(topo, STEPS)
    for res in per_rank:
        for a, x in res.items():
            assert rel_err(x, trace.X[STEPS][a]) <= TOL


def test_failures_are_loud_and_name_the_problem():
    results = spawn(workers.failures, 3, 1, 5, allow_errors=True, timeout=180)
    assert results[1][0] == "dead"
    for rank in (0, 2):
        status, out = results[rank]
        assert status == "ok", out
        assert "4" in out["world"] and "3" in out["world"], out["world"]
        assert "differ" in out["hash"] and "rank(s) [1, 2]" in out["hash"] or "rank(s) [0]" in out["hash"], out["hash"]
        assert "lost peer rank(s) [1]" in out["dead"], out["dead"]
        assert out["dead_after_s"] < 60


def test_model_buffers_are_mixed_by_default_or_kept_local():
    results = spawn(workers.batchnorm_buffers, 4)
    for rank, res in enumerate(results):
        mean, var, _ = res[True]
        assert torch.allclose(mean, torch.full((4,), 1.5)) and torch.allclose(var, torch.full((4,), 2.5))
        mean, var, _ = res[False]
        assert torch.equal(mean, torch.full((4,), float(rank))) and torch.equal(var, torch.full((4,), 1.0 + rank))


def test_exact_average_is_the_weighted_mean_and_bitwise_the_evaluation_models_formula():
    results = spawn(workers.exact_averages, 4)
    weights = torch.tensor([r["weight"] for r in results], dtype=torch.float64)
    expected = sum(r["weight"] * r["mine"] for r in results) / weights.sum()
    for r in results:
        assert torch.equal(r["slot"], r["classic"])  # the trainer's formula, bit for bit
        assert r["slot_weight"] == 1.0
        assert rel_err(r["split"], expected) <= 1e-14 and rel_err(r["classic"], expected) <= 1e-14
        assert rel_err(r["f32"].double(), expected) <= 1e-6
        assert r["wsum"][0] == r["wsum"][2] and abs(r["wsum"][1] - float(weights.sum())) <= 1e-15
        assert torch.equal(r["split"], results[0]["split"])  # every rank holds the same average
