"""Which elastic checkpoint a resume may take: a step whose generation's members all wrote theirs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from lookahead_dist.errors import CheckpointError
from lookahead_dist.train import elastic_checkpoint as ec


def head(ckdir, step, member, generation, members):
    folder = ckdir / f"elastic_step_{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    h = {"step": step, "member": member, "generation": generation, "members": list(members)}
    (folder / f"member_{member}.json").write_text(json.dumps(h))


def test_a_step_counts_only_when_every_member_of_one_generation_wrote_it(tmp_path):
    for m in range(4):
        head(tmp_path, 10, m, 0, range(4))
    for m in (0, 1, 3):
        head(tmp_path, 20, m, 0, range(4))  # member 2 died before writing step 20
    for m in (0, 1, 3):
        head(tmp_path, 30, m, 1, (0, 1, 3))
    head(tmp_path, 40, 0, 1, (0, 1, 3))  # the others had not written step 40 yet
    assert ec.complete_steps(tmp_path) == [(30, 1, (0, 1, 3)), (10, 0, (0, 1, 2, 3))]


def test_a_folder_with_two_generations_counts_the_newest_complete_one(tmp_path):
    for m in range(4):
        head(tmp_path, 20, m, 0, range(4))
    assert ec.complete_steps(tmp_path) == [(20, 0, (0, 1, 2, 3))]
    for m in (0, 1, 3):  # after member 2's loss the survivors repeat step 20 and overwrite theirs
        head(tmp_path, 20, m, 1, (0, 1, 3))
    assert ec.complete_steps(tmp_path) == [(20, 1, (0, 1, 3))]
    head(tmp_path, 20, 3, 2, (0, 1))  # member 3 overwrote its file in generation 2, member 1's is unreadable
    (tmp_path / "elastic_step_00000020" / "member_1.json").write_text("{not json")
    assert ec.complete_steps(tmp_path) == []


def fake_el(member, generation, members):
    lin = torch.nn.Linear(2, 1)
    opt = SimpleNamespace(state_dict=lambda: {"w": lin.weight.detach().clone()})
    view = SimpleNamespace(generation=generation, members=tuple(members))
    return SimpleNamespace(member=member, view=view, opt=opt), lin


def test_save_writes_the_state_then_its_header_and_keeps_the_newest_three(tmp_path):
    el, model = fake_el(1, 0, range(2))
    for step in (10, 20, 30, 40):
        ec.save(tmp_path, el, model, step, (1, 2))
    ck = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == [f"elastic_step_{s:08d}" for s in (20, 30, 40)]
    state = ec._read(ck / "elastic_step_00000040" / "member_1.pt", 40, 0, 1)
    assert (
        state["shard"] == [1, 2] and state["members"] == [0, 1] and torch.equal(state["model"]["weight"], model.weight)
    )
    # a .pt overwritten by a later generation than its .json says is refused, naming the file
    with pytest.raises(
        CheckpointError,
        match=r"member_1.pt holds step 40 of generation 0 \(member 1\), expected step 40 of generation 1",
    ):
        ec._read(ck / "elastic_step_00000040" / "member_1.pt", 40, 1, 1)
    (ck / "elastic_step_00000030" / "member_1.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match=r"member_1.pt is truncated or corrupt"):
        ec._read(ck / "elastic_step_00000030" / "member_1.pt", 30, 0, 1)
