"""With no failure, training through :class:`~lookahead_dist.regroup.Elastic` (wrappers built with
``elastic=True``) is the reference engine: D-PSGD over a ring and over one-peer exponential, push-sum
(SGP) over one-peer exponential, SlowMo over a ring, and D-PSGD (push-sum where the file says so) over
every shipped topology file that runs on 4 ranks without slow agents; 4 gloo members, float64, to 1e-10."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lookahead_dist.errors import TopologyError
from lookahead_dist.reference.simulate import Reference, SlowMomentum
from lookahead_dist.testing.elastic_workers import run_members, trial
from lookahead_dist.testing.verify import LR, SEED, make_problem, sgd
from lookahead_dist.topology import builtin, load

pytestmark = pytest.mark.dist

TOL = 1e-10
W = 4
STEPS = 8
SGP = {"name": "sgp", "generator": "one_peer_exponential", "push_sum": True}

CASES = {
    "dpsgd-ring": dict(algo="dpsgd", topology="ring"),
    "dpsgd-one-peer-exponential": dict(algo="dpsgd", topology="one_peer_exponential"),
    "sgp-one-peer-exponential": dict(algo="dpsgd", topology=SGP),
    "slowmo-ring": dict(algo="slowmo", topology="ring", tau=3, alpha=1.0, beta=0.5),
}


def _shipped_files() -> list[str]:
    """Every topologies/*.yaml that loads for 4 ranks with fast agents only (what elastic membership runs)."""
    out = []
    for path in sorted((Path(__file__).resolve().parents[2] / "topologies").glob("*.yaml")):
        try:
            topo = load(str(path), world_size=W)
        except TopologyError:  # another size (torus 3 x 3, two_agent) or slow agents on ranks of their own
            continue
        if "slow" not in topo.roles:
            out.append(str(path))
    return out


FILES = _shipped_files()
CASES_BUILTIN = {"ring", "one_peer_exponential"}
CASES.update({f"dpsgd-file-{Path(f).stem}": dict(algo="dpsgd", topology=f) for f in FILES})


def test_the_shipped_files_are_covered():
    names = {Path(f).stem for f in FILES}
    assert {"ring", "complete", "directed_push_sum", "edges_example", "hierarchical", "time_varying"} <= names, names


def reference(cfg):
    spec = cfg["topology"]
    topo = builtin(spec, world_size=W) if isinstance(spec, str) and spec in CASES_BUILTIN else load(spec, world_size=W)
    prob = make_problem(W, SEED)
    slow = None
    if cfg["algo"] == "slowmo":
        slow = SlowMomentum(alpha=cfg["alpha"], beta=cfg["beta"], tau=cfg["tau"])
    ref = Reference(topo.schedule, ["fast"] * W, prob.x0, prob, lambda p: sgd(p, LR), slow_momentum=slow)
    hist = [ref.X.clone()]
    for _ in range(STEPS):
        ref.step()
        hist.append(ref.X.clone())
    # the consensus: sum of numerators / sum of weights (push-sum), the mean otherwise
    w = ref.weights
    consensus = ref.numerators.sum(0) / w.sum() if w is not None else hist[-1].mean(0)
    return hist, consensus


@pytest.mark.parametrize("name", list(CASES))
def test_elastic_without_a_failure_is_the_reference_engine(name):
    cfg = dict(CASES[name], steps=STEPS)
    results, killed = run_members(trial, W, cfg, timeout=120)
    assert not killed
    assert all(status == "ok" for status, _ in results.values()), results
    hist, consensus = reference(cfg)
    worst = 0.0
    for (m, _), (_, v) in results.items():
        assert v["events"] == [] and v["view"]["generation"] == 0
        for t in range(1, STEPS + 1):
            scale = max(1.0, float(hist[t].abs().max()))
            worst = max(worst, float((v["trace"][t] - hist[t][m]).abs().max()) / scale)
    assert worst <= TOL, worst
    # finalize: every member holds the reference's consensus (push-sum: sum of numerators / sum of weights)
    finals = [v["final"] for _, v in results.values()]
    assert all(torch.equal(f, finals[0]) for f in finals)
    assert float((finals[0] - consensus).abs().max()) <= TOL * max(1.0, float(consensus.abs().max()))
