"""A whole node lost under a hierarchical placement: the other node's workers go on alone.

Two supervisors of ``python -m lookahead_dist.elastic`` (two "nodes" on this machine, two
workers each) run ``launch/train.py`` with ``elastic.enabled=true`` over
``topologies/hierarchical.yaml`` (2 nodes x 2, exact average within a node, ring between
nodes). While they train, node 1's supervisor and both its workers are SIGKILLed at once,
so nobody reports the deaths: node 0's workers find them through the failed exchange and
the heartbeats gone stale, agree on themselves, re-plan the hierarchy for one node of two
and finish. Every process runs in a session of its own, killed as a group at teardown.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.elastic._nodes import free_port, kill_all, node_cmd

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[2]
STEPS = 100  # about 9 s of training for four workers on two cores
KILL_AFTER = 30  # node 1 dies once rank 0 has logged this step


@pytest.fixture
def nodes(tmp_path):
    started = []

    def start(node_rank, port, out):
        # node 1's supervisor never says it is done; node 0 must not wait for it once its members are lost
        cmd = node_cmd(node_rank, port, "launch/train.py", "--out", str(out), exit_timeout=60)
        sets = ["elastic.enabled=true", "algorithm.topology=topologies/hierarchical.yaml", f"steps={STEPS}"]
        sets += ["eval_every=0", "log_every=5", "elastic.heartbeat=0.2", "elastic.dead_after=3"]
        for s in sets:
            cmd += ["--set", s]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        log = tmp_path / f"node{node_rank}.log"
        with open(log, "w") as f:
            p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        started.append((p, log))
        return p

    def tails():
        return "\n".join(f"--- {log.name}:\n{log.read_text()[-3000:]}" for _, log in started)

    start.tails = tails
    yield start
    kill_all([p for p, _ in started])


def records(run: Path) -> list[dict]:
    out = []
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


def test_losing_a_whole_node_leaves_the_other_node_to_finish(nodes, tmp_path):
    run, port = tmp_path / "run", free_port()
    node0 = nodes(0, port, run)
    node1 = nodes(1, port, run)

    deadline = time.monotonic() + 45
    while not any(r["step"] >= KILL_AFTER for r in records(run)):
        if node0.poll() is not None or node1.poll() is not None:
            pytest.fail(f"a node ended before step {KILL_AFTER}:\n{nodes.tails()}")
        if time.monotonic() > deadline:
            pytest.fail(f"rank 0 did not log step {KILL_AFTER} within 45 s:\n{nodes.tails()}")
        time.sleep(0.05)
    seen = max(r["step"] for r in records(run))
    assert seen < STEPS, "training ended before node 1 could be killed"
    os.killpg(node1.pid, signal.SIGKILL)  # node 1's supervisor and both its workers: nobody reports the deaths
    node1.wait()

    try:
        rc = node0.wait(timeout=45)
    except subprocess.TimeoutExpired:
        pytest.fail(f"node 0 did not finish within 45 s of node 1's death:\n{nodes.tails()}")
    text = (tmp_path / "node0.log").read_text()
    assert rc == 0, nodes.tails()
    assert "member 0 finished" in text and "member 1 finished" in text, text
    assert "did not say they were done" not in text, text

    summary = json.loads((run / "summary.json").read_text())
    assert summary["survivors"] == [0, 1] and summary["lost"] == [2, 3], summary
    assert summary["generation"] == 1 and summary["steps"] == STEPS, summary
    (event,) = summary["elastic_events"]
    assert event["reason"] == "failure" and event["world_size"] == 2 and event["lost"] == [2, 3], event
    assert event["topology"] == "hierarchical on 2", event  # re-planned: one node of two
    # they go on from about where they were, not from the start
    assert seen - 4 <= event["to_step"] <= event["from_step"] < STEPS, (seen, event)
    assert "generation 1: lost [2, 3]" in text and "survivors [0, 1], lost [2, 3]" in text, text
    last = records(run)[-1]
    assert last["step"] == STEPS and last["world_size"] == 2, last
    assert summary["final_test_accuracy"] > 0.8, summary
    assert (run / "model.pt").is_file()
