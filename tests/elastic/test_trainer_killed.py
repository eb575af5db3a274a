"""The run config's elastic mode under the launcher: a trainer process SIGKILLed mid-run, the others finish.

``python -m lookahead_dist.elastic --standalone --nproc_per_node=4 launch/train.py --set elastic.enabled=true
--set debug.kill_step=... --set debug.kill_rank=2``: member 2 kills itself at a step, its supervisor reports it,
the three survivors regroup, re-plan the ring for 3 and finish the run; the summary names them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[2]


def launch(out, *sets, nproc=4, timeout=240):
    cmd = [sys.executable, "-m", "lookahead_dist.elastic", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["launch/train.py", "--out", str(out), "--set", "elastic.enabled=true"]
    for s in ("steps=60", "eval_every=0", "log_every=20", "elastic.heartbeat=0.2", "elastic.dead_after=3", *sets):
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


def test_a_killed_trainer_worker_leaves_the_survivors_to_finish(tmp_path):
    rc, text = launch(tmp_path / "run", "debug.kill_step=25", "debug.kill_rank=2")
    assert rc == 0, text[-3000:]
    assert "member 2 lost (signal 9)" in text, text[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["survivors"] == [0, 1, 3] and summary["lost"] == [2] and summary["generation"] == 1
    (event,) = summary["elastic_events"]
    assert event["world_size"] == 3 and event["to_step"] <= 25 and event["lost"] == [2]
    assert "generation 1: lost [2]" in text and "survivors [0, 1, 3], lost [2]" in text
    assert summary["steps"] == 60 and summary["final_test_accuracy"] > 0.8, summary
    assert (tmp_path / "run" / "model.pt").is_file()
