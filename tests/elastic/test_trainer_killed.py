"""The run config's elastic mode under the launcher: trainer processes SIGKILLed mid-run.

``python -m lookahead_dist.elastic --standalone --nproc_per_node=4 launch/train.py --set elastic.enabled=true
--set debug.kill_step=... --set debug.kill_rank=2``: member 2 kills itself at a step, its supervisor reports it,
the three survivors regroup, re-plan the ring for 3 and finish the run; the summary names them. Their
checkpoints (one file per member) resume on three workers to the model of a run that was never stopped; a
file that cannot be re-planned stops the job, whose checkpoint resumes on the full size, bit for bit; with
``--max-restarts`` the killed worker comes back and rejoins.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[2]
BASE = ("eval_every=0", "log_every=20", "elastic.heartbeat=0.2", "elastic.dead_after=3", "optim.schedule=constant")
KILL2 = ("debug.kill_step=25", "debug.kill_rank=2")


def launch(out, *sets, nproc=4, flags=(), timeout=240):
    cmd = [sys.executable, "-m", "lookahead_dist.elastic", "--standalone", f"--nproc_per_node={nproc}", *flags]
    cmd += ["launch/train.py", "--out", str(out), "--set", "elastic.enabled=true"]
    for s in (*BASE, *sets):
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)  # fmt: skip
    try:
        text, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the supervisor and every worker it started
        text, _ = p.communicate()
        pytest.fail(f"the elastic run did not end within {timeout} s:\n{text[-3000:]}")
    return p.returncode, text


def same_model(a: Path, b: Path) -> bool:
    x, y = (torch.load(p / "model.pt", weights_only=True) for p in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    run = tmp_path_factory.mktemp("killed") / "run"
    rc, text = launch(run, "steps=60", "checkpoint_every=20", *KILL2)
    return run, rc, text


def test_a_killed_trainer_worker_leaves_the_survivors_to_finish(killed):
    run, rc, text = killed
    assert rc == 0, text[-3000:]
    assert "member 2 lost (signal 9)" in text, text[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["survivors"] == [0, 1, 3] and summary["lost"] == [2] and summary["generation"] == 1
    (event,) = summary["elastic_events"]
    assert event["world_size"] == 3 and event["to_step"] <= 25 and event["lost"] == [2]
    assert event["topology"] == "ring on 3"
    assert "generation 1: lost [2]" in text and "survivors [0, 1, 3], lost [2]" in text
    assert summary["steps"] == 60 and summary["final_test_accuracy"] > 0.8, summary
    assert (run / "model.pt").is_file()
    # one file per member: member 2's last checkpoint is step 20; steps 40 and 60 are the survivors' alone
    ck = run / "checkpoints"
    assert sorted(p.name for p in (ck / "elastic_step_00000020").glob("*.pt")) == [f"member_{m}.pt" for m in range(4)]
    assert sorted(p.name for p in (ck / "elastic_step_00000060").glob("*.pt")) == [f"member_{m}.pt" for m in (0, 1, 3)]


def test_the_survivors_checkpoint_resumes_on_as_many_workers_as_the_run_never_stopped(killed, tmp_path):
    run, rc, _ = killed
    assert rc == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    # four workers cannot take three members' states: refused, naming both counts, before any step
    rc, text = launch(resumed, "steps=80", "checkpoint_every=20", "resume=true")
    assert rc != 0
    assert "step 60 of generation 1, holds the states of 3 member(s) [0, 1, 3]; this run has 4" in text, text[-3000:]
    # three workers go on from step 60 as members 0, 1 and 3 did (their states and data shards)
    rc, text = launch(resumed, "steps=80", "checkpoint_every=20", "resume=true", nproc=3)
    assert rc == 0, text[-3000:]
    assert "resumed at step 60" in text, text[-3000:]
    straight = tmp_path / "straight"
    rc, text = launch(straight, "steps=80", *KILL2)
    assert rc == 0, text[-3000:]
    assert same_model(resumed, straight)
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [20, 40, 60, 80]


def test_a_file_that_cannot_be_replanned_stops_the_job_and_its_checkpoint_resumes_bit_for_bit(tmp_path):
    fixed = ("steps=40", "checkpoint_every=10", "algorithm.topology=topologies/edges_example.yaml")
    rc, text = launch(tmp_path / "run", *fixed, *KILL2)
    assert rc != 0
    assert "edges_example.yaml: cannot be re-planned for 3 ranks after a membership change" in text, text[-3000:]
    rc, text = launch(tmp_path / "run", *fixed, "resume=true")  # the full size again: member 2 is back
    assert rc == 0, text[-3000:]
    assert "resumed at step 20" in text
    rc, text = launch(tmp_path / "straight", *fixed)
    assert rc == 0, text[-3000:]
    assert same_model(tmp_path / "run", tmp_path / "straight")


def test_a_restarted_trainer_worker_rejoins_and_finishes_with_the_others(tmp_path):
    run = tmp_path / "run"
    sets = ("steps=120", "checkpoint_every=40", "debug.step_sleep=0.1", *KILL2)
    rc, text = launch(run, *sets, flags=("--max-restarts=1",))
    assert rc == 0, text[-3000:]
    assert "member 2 lost (signal 9); restarting it to rejoin" in text, text[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["survivors"] == [0, 1, 2, 3] and summary["lost"] == []
    assert [e["reason"] for e in summary["elastic_events"]] == ["failure", "join"], summary["elastic_events"]
    assert summary["elastic_events"][1]["joined"] == [2] and summary["elastic_events"][1]["world_size"] == 4
    assert summary["final_test_accuracy"] > 0.8
    # the rejoined member wrote its own checkpoints again, and the run's log was not rewritten by it
    assert (run / "checkpoints" / "elastic_step_00000120" / "member_2.json").is_file()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(20, 121, 20)), steps
