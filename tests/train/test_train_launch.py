"""launch/train.py under torchrun on 2 gloo ranks: a short real run, a NaN on one rank, a resume."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from lookahead_dist.train.config import REPO_ROOT

FIXTURES = REPO_ROOT / "tests" / "train" / "_fixtures"

pytestmark = pytest.mark.dist

TRAIN = str(REPO_ROOT / "launch" / "train.py")
COMMON = ["--set", "steps=60", "--set", "log_every=10", "--set", "eval_every=30", "--set", "checkpoint_every=30"]


def torchrun(cwd, *args, nproc: int = 2, timeout: float = 120.0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", TRAIN, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cwd")  # not the repository: the default topology must still be found
    proc = torchrun(cwd, *COMMON, "--out", "run")
    return cwd / "run", proc


def test_short_run_writes_the_run_directory(good_run):
    run, proc = good_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/manifest.json"):
        assert (run / name).is_file(), name
    assert (run / "plot.png").read_bytes()[:4] == b"\x89PNG"  # matplotlib is in the test extras
    assert (run / "model.pt").is_file()
    recs = records(run)
    assert [r["step"] for r in recs] == [10, 20, 30, 40, 50, 60]
    for r in recs:
        assert set(r) >= {"step", "loss", "lr", "consensus_distance", "bytes_sent", "wall_time_s"}
        assert r["loss"] > 0 and r["lr"] > 0 and r["consensus_distance"] >= 0
    assert [r["step"] for r in recs if "test_accuracy" in r] == [30, 60]
    assert recs[-1]["loss"] < recs[0]["loss"]
    assert recs[-1]["bytes_sent"] > recs[0]["bytes_sent"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["world_size"] == 2 and summary["algorithm"] == "slowmo"
    assert summary["final_test_accuracy"] == recs[-1]["test_accuracy"] > 0.5
    assert summary["test_examples"] == 360 and len(summary["bytes_sent_per_rank"]) == 2
    assert f"test accuracy {summary['final_test_accuracy']:.4f}" in proc.stdout
    manifest = json.loads((run / "checkpoints" / "manifest.json").read_text())
    assert manifest == {"step": 60, "world_size": 2, "files": ["step_00000060/rank_0.pt", "step_00000060/rank_1.pt"]}
    assert (run / "checkpoints" / "step_00000030" / "rank_1.pt").is_file()  # kept for a fallback (KEEP = 2)


def test_nan_on_one_rank_stops_every_rank_then_resume_matches(good_run, tmp_path):
    good, _ = good_run
    run = tmp_path / "run"
    proc = torchrun(tmp_path, *COMMON, "--out", str(run), "--set", "debug.nan_step=45", "--set", "debug.nan_rank=1")
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"[rank {rank}] DivergenceError: step 45: the loss is not finite ([nan]) on rank(s) [1]" in proc.stderr
    # Each rank printed its own error on its way to a non-zero exit (torchrun itself reports only the first
    # rank to exit and stops the others).
    assert "last good checkpoint: step 30" in proc.stderr
    manifest = json.loads((run / "checkpoints" / "manifest.json").read_text())
    assert manifest["step"] == 30
    state = torch.load(run / "checkpoints" / manifest["files"][1], weights_only=True)
    assert state["step"] == 30 and all(
        torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()
    )
    assert max(r["step"] for r in records(run)) == 40

    proc = torchrun(tmp_path, *COMMON, "--out", str(run), "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "from step 30" in proc.stdout
    resumed, straight = records(run), records(good)
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    for a, b in zip(resumed, straight):  # the same batches, states and schedule: the same trajectory
        assert (a["loss"], a["lr"], a.get("test_accuracy"), a["bytes_sent"]) == (
            b["loss"],
            b["lr"],
            b.get("test_accuracy"),
            b["bytes_sent"],
        )


def test_torchrun_restart_after_a_killed_worker_ends_identical(good_run, tmp_path):
    """Under --max-restarts=1 a worker killed mid-run restarts the group from the last checkpoint."""
    run, _ = good_run
    cmd_extra = ["--set", "debug.kill_step=45", "--set", "debug.kill_rank=1"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--max-restarts=1",
        TRAIN,
        *COMMON,
        *cmd_extra,
        "--out",
        "killed",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "restart 1 of this torchrun group: resuming from" in out
    a = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)
    b = torch.load(run / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in records(tmp_path / "killed")] == [10, 20, 30, 40, 50, 60]


def test_resume_skips_a_checkpoint_damaged_on_one_rank_and_every_rank_takes_the_older_one(good_run, tmp_path):
    good, _ = good_run
    run = tmp_path / "run"
    shutil.copytree(good, run)
    damaged = run / "checkpoints" / "step_00000060" / "rank_1.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])  # truncated on rank 1 only; rank 0's step-60 file is whole
    proc = torchrun(tmp_path, *COMMON, "--out", str(run), "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"skipped newer checkpoint(s): checkpoint file {damaged} is truncated or corrupt" in proc.stdout
    assert "from step 30" in proc.stdout
    a = torch.load(run / "model.pt", weights_only=True)
    b = torch.load(good / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in records(run)] == [10, 20, 30, 40, 50, 60]


def test_a_run_checkpointed_before_the_renames_resumes_to_the_same_model(tmp_path):
    """tests/train/_fixtures/README.md: a 2-rank SlowMo run of the code before the renames, stopped after its
    step-10 checkpoint, resumes on this code and ends with the model of that code's uninterrupted run."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run_before_rename", run)
    short = ["--set", "steps=20", "--set", "log_every=10", "--set", "eval_every=10", "--set", "checkpoint_every=10"]
    proc = torchrun(tmp_path, *short, "--out", str(run), "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "from step 10" in proc.stdout
    a = torch.load(run / "model.pt", weights_only=True)
    b = torch.load(FIXTURES / "straight_model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_overlapped_run_resumes_to_the_same_model(tmp_path):
    """Gossip and slow step overlapped (algorithm.overlap, algorithm.overlap_slow): stopped by a NaN at step 45
    and resumed from the step-30 checkpoint, written while the slow step begun at step 29's end was still to be
    applied, it ends with the uninterrupted run's model, bit for bit."""
    ov = ["--set", "algorithm.overlap=true", "--set", "algorithm.overlap_slow=true", "--set", "algorithm.tau=10"]
    proc = torchrun(tmp_path, *COMMON, *ov, "--out", "straight")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["final_test_accuracy"] > 0.5
    run = tmp_path / "stopped"
    proc = torchrun(tmp_path, *COMMON, *ov, "--out", str(run), "--set", "debug.nan_step=45")
    assert proc.returncode != 0 and "last good checkpoint: step 30" in proc.stderr
    state = torch.load(run / "checkpoints" / "step_00000030" / "rank_0.pt", weights_only=False)
    assert set(state["optimizer"]["slowmo"]["pending_slow"]) == {"sent", "x_bar", "gamma"}
    proc = torchrun(tmp_path, *COMMON, *ov, "--out", str(run), "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a = torch.load(run / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_diloco_config_runs_with_an_int8_sync_and_checkpoints_the_outer_state(tmp_path):
    """launch/configs/digits_diloco.yaml (AdamW inner, Nesterov SGD outer) on 2 ranks, tau 10, the sync in int8
    in 2 fragments: it learns, says what runs, records the filled-in outer section, and its checkpoints hold the
    outer optimizer's momentum and the error-feedback residuals."""
    args = ["--config", str(REPO_ROOT / "launch" / "configs" / "digits_diloco.yaml"), *COMMON]
    args += ["--set", "algorithm.tau=10", "--set", "algorithm.sync_dtype=int8", "--set", "algorithm.fragments=2"]
    proc = torchrun(tmp_path, *args, "--out", "run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    assert "[train] algorithm diloco: every tau=10 steps of adamw (local, no communication" in proc.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["algorithm"] == "diloco" and summary["final_test_accuracy"] > 0.6
    sent = summary["bytes_sent_per_rank"]
    params = sum(t.numel() for t in torch.load(run / "model.pt", weights_only=True).values() if t.is_floating_point())
    # 12 fragment syncs of half the model each in int8 (about 1 byte per element there and back, plus scales):
    # far under what float32 all-reduces would send (2 (p-1)/p x 4 bytes x the model, 6 times)
    assert sent[0] == sent[1] and 0 < sent[0] < 6 * 4 * params / 2
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["outer"] == {
        "name": "sgd",
        "lr": 0.7,
        "momentum": 0.9,
        "nesterov": True,
        "betas": None,
        "eps": None,
        "weight_decay": 0.0,
    }
    assert (config["algorithm"]["alpha"], config["algorithm"]["beta"], config["algorithm"]["topology"]) == (
        None,
        None,
        None,
    )
    state = torch.load(run / "checkpoints" / "step_00000060" / "rank_1.pt", weights_only=False)["optimizer"]["slowmo"]
    assert state["outer"]["state"] and all("momentum_buffer" in s for s in state["outer"]["state"].values())
    assert state["compress"]["sync_dtype"] == "int8" and len(state["compress"]["syncs"]) == 2
