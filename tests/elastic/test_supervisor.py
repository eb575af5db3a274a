"""The launcher: two supervisors (two "nodes" on this machine) running real worker processes.

A worker killed with SIGKILL is restarted by its supervisor and rejoins while its
siblings go on; killing the supervisor that hosts the store stops every worker
cleanly, each naming the lost store. Every process is started in a session of its
own and its whole process group is killed at teardown.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import time

import pytest
import torch

from tests.elastic._nodes import free_port, kill_all, node_cmd

pytestmark = pytest.mark.dist


@pytest.fixture
def launch(tmp_path):
    procs = []

    def start(node_rank, port, cfg, *flags):
        cmd = node_cmd(
            node_rank, port, *flags, "-m", "lookahead_dist.testing.elastic_workers", json.dumps(cfg), str(tmp_path)
        )
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # fmt: skip
        procs.append(p)
        return p

    yield start
    kill_all(procs)


def results(tmp_path):
    out = {}
    for name in os.listdir(tmp_path):
        if name.endswith(".pkl"):
            m, inc = (int(x) for x in name[:-4].split("."))
            with open(tmp_path / name, "rb") as f:
                out[(m, inc)] = pickle.load(f)
    return out


def test_killed_worker_is_restarted_and_rejoins_while_its_siblings_go_on(launch, tmp_path):
    # the others go on until the restarted process (a fresh interpreter importing torch) is back
    cfg = dict(algo="slowmo", topology="ring", tau=3, alpha=1.0, beta=0.5, steps=30, kills={1: 4}, step_sleep=0.02)
    cfg["await_rejoin"] = True
    port = free_port()
    a = launch(0, port, cfg, "--max-restarts=1")
    b = launch(1, port, cfg, "--max-restarts=1")
    out_a, _ = a.communicate(timeout=300)
    out_b, _ = b.communicate(timeout=60)
    assert a.returncode == 0 and b.returncode == 0, out_a + out_b + repr(results(tmp_path).get((1, 1)))
    assert "member 1 lost (signal 9); restarting it to rejoin" in out_a
    res = results(tmp_path)
    assert sorted(res) == [(0, 0), (1, 1), (2, 0), (3, 0)], res.keys()
    assert all(status == "ok" for status, _ in res.values()), res
    finals = [v["final"] for _, v in res.values()]
    assert all(torch.equal(f, finals[0]) for f in finals)
    assert {tuple(v["view"]["members"]) for _, v in res.values()} == {(0, 1, 2, 3)}
    assert [e["reason"] for e in res[(0, 0)][1]["events"]] == ["failure", "join"]


def test_killing_the_store_host_stops_every_worker_naming_it(launch, tmp_path):
    cfg = dict(algo="dpsgd", topology="ring", steps=2000, step_sleep=0.02, progress_dir=str(tmp_path))
    port = free_port()
    a = launch(0, port, cfg)
    b = launch(1, port, cfg)
    deadline = time.monotonic() + 180
    while sum(n.endswith(".running") for n in os.listdir(tmp_path)) < 4 and time.monotonic() < deadline:
        assert a.poll() is None and b.poll() is None
        time.sleep(0.2)
    os.kill(a.pid, signal.SIGKILL)  # node 0's supervisor, which holds the store, while all four train
    out_b, _ = b.communicate(timeout=120)
    assert b.returncode == 1, out_b
    deadline = time.monotonic() + 60
    while len(results(tmp_path)) < 4 and time.monotonic() < deadline:
        time.sleep(0.5)
    res = results(tmp_path)
    assert sorted(res) == [(0, 0), (1, 0), (2, 0), (3, 0)]
    for status, text in res.values():
        assert status == "error" and "elastic store is unreachable" in text, text
