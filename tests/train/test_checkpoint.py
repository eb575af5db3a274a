"""Checkpoints in one process: what is kept, damaged files named, and a resume that every rank agrees on.

Several ranks are threads here, joined by a comm that gathers through shared memory (no process group).
"""

import json
import threading

import pytest
import torch

from lookahead_dist.train import checkpoint
from lookahead_dist.train.checkpoint import CheckpointError


class ThreadComm:
    """The three calls of Comm that checkpoints use, for ``world_size`` threads of one process."""

    def __init__(self, rank: int, shared: dict):
        self.rank, self.world_size, self._shared = rank, shared["world"], shared

    def barrier(self):
        self._shared["barrier"].wait(timeout=30)

    def all_gather_object(self, obj):
        self._shared["slots"][self.rank] = obj
        self.barrier()
        out = list(self._shared["slots"])
        self.barrier()
        return out


def group(world: int) -> list[ThreadComm]:
    shared = {"world": world, "barrier": threading.Barrier(world), "slots": [None] * world}
    return [ThreadComm(r, shared) for r in range(world)]


def on_ranks(fn, world: int):
    """``fn(comm)`` on ``world`` threads; the per-rank results (an exception is returned, not raised)."""
    comms, out = group(world), [None] * world

    def target(r):
        try:
            out[r] = fn(comms[r])
        except Exception as exc:  # noqa: BLE001 - compared by the test
            out[r] = exc

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def model_and_opt(fill: float):
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(fill)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def save_steps(run, steps, world: int = 1):
    """Checkpoints at ``steps`` on ``world`` ranks; rank r's weights at step s are all s + r / 4."""

    def fn(comm):
        for s in steps:
            model, opt = model_and_opt(s + comm.rank / 4)
            checkpoint.save(run, s, comm, model, opt, bytes_sent=100 * s)

    on_ranks(fn, world)


def resume(run, world: int = 1):
    """[(step, bytes_sent, weight) or the exception] per rank."""

    def fn(comm):
        model, opt = model_and_opt(-1.0)
        step, sent = checkpoint.resume(run, comm, model, opt)
        return step, sent, float(model.weight.detach()[0, 0])

    return on_ranks(fn, world)


def rank_file(run, step: int, rank: int):
    return run / "checkpoints" / f"step_{step:08d}" / f"rank_{rank}.pt"


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_save_keeps_the_newest_checkpoints_and_the_manifest_names_the_last(tmp_path):
    stale = tmp_path / "checkpoints" / "step_00000050"  # left by an attempt that did not finish
    stale.mkdir(parents=True)
    (stale / "rank_0.pt").write_bytes(b"partial")
    save_steps(tmp_path, [10, 20, 30], world=2)
    folders = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert folders == ["step_00000020", "step_00000030"] and checkpoint.KEEP == 2
    manifest = json.loads((tmp_path / "checkpoints" / "manifest.json").read_text())
    assert manifest == {"step": 30, "world_size": 2, "files": ["step_00000030/rank_0.pt", "step_00000030/rank_1.pt"]}
    assert resume(tmp_path, world=2) == [(30, 3000, 30.0), (30, 3000, 30.25)]


@pytest.mark.parametrize(
    "damage, words",
    [
        (truncate, "is truncated or corrupt"),
        (lambda p: p.write_bytes(b"not a checkpoint at all"), "is truncated or corrupt"),
        (lambda p: p.unlink(), "is missing"),
        (lambda p: torch.save({"step": 30}, p), "is not a checkpoint of this trainer"),
    ],
)
def test_a_damaged_file_is_named(tmp_path, damage, words):
    save_steps(tmp_path, [30])
    path = rank_file(tmp_path, 30, 0)
    damage(path)
    with pytest.raises(CheckpointError, match=f"checkpoint file {path} {words}"):
        checkpoint.read_rank_file(path, 30, 0, 1)


def test_a_file_of_another_step_or_rank_is_named(tmp_path):
    save_steps(tmp_path, [30], world=2)
    path = rank_file(tmp_path, 30, 1)
    with pytest.raises(CheckpointError, match=f"{path} holds step 30 of rank 1 of 2, expected step 30 of rank 0"):
        checkpoint.read_rank_file(path, 30, 0, 2)


@pytest.mark.parametrize("damage", [truncate, lambda p: p.unlink()], ids=["truncated", "named-but-missing"])
def test_resume_falls_back_to_the_newest_checkpoint_complete_on_every_rank(tmp_path, damage, capsys):
    save_steps(tmp_path, [10, 20], world=2)
    damage(rank_file(tmp_path, 20, 1))  # rank 0's file of step 20 is fine: rank 0 must still take step 10
    assert resume(tmp_path, world=2) == [(10, 1000, 10.0), (10, 1000, 10.25)]
    out = capsys.readouterr().out
    assert "[train] resume: skipped newer checkpoint(s)" in out and str(rank_file(tmp_path, 20, 1)) in out
    assert out.count("[train] resume:") == 1  # rank 0 alone says so


def test_resume_with_no_complete_checkpoint_names_every_damaged_file(tmp_path):
    save_steps(tmp_path, [10, 20], world=2)
    truncate(rank_file(tmp_path, 20, 0))
    rank_file(tmp_path, 10, 1).unlink()
    results = resume(tmp_path, world=2)
    for exc in results:  # every rank raises the same error
        assert isinstance(exc, CheckpointError)
        assert "is complete on every rank" in str(exc)
        assert f"{rank_file(tmp_path, 20, 0)} is truncated or corrupt" in str(exc)
        assert f"{rank_file(tmp_path, 10, 1)} is missing" in str(exc)
    assert str(results[0]) == str(results[1])


def test_resume_without_any_checkpoint_or_with_another_world_size(tmp_path):
    (exc,) = resume(tmp_path)
    assert isinstance(exc, CheckpointError) and "no readable checkpoint manifest at" in str(exc)
    save_steps(tmp_path, [10], world=2)
    (exc,) = resume(tmp_path, world=1)
    assert isinstance(exc, CheckpointError) and "was written by 2 rank(s), this run has 1" in str(exc)


def test_a_corrupt_manifest_falls_back_to_the_checkpoints_on_disk(tmp_path, capsys):
    save_steps(tmp_path, [10, 20])
    manifest = tmp_path / "checkpoints" / "manifest.json"
    manifest.write_text('{"step": 2')
    assert resume(tmp_path) == [(20, 2000, 20.0)]
    assert f"the checkpoint manifest {manifest} is corrupt" in capsys.readouterr().out
