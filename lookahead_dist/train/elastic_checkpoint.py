"""Checkpoints of an elastic run: one file per member, written without a barrier, and a resume that finds the
newest step at which one generation's members all wrote theirs.

::

    RUN/checkpoints/elastic_step_00000040/member_3.pt     {"step", "member", "generation", "members", "shard",
                                                            "model", "optimizer"}
    RUN/checkpoints/elastic_step_00000040/member_3.json   {"step", "member", "generation", "members"}

A member writes its ``.pt`` (to a temporary name, then moved into place) and then its ``.json``; it
never waits for the others, so that a death can only surface inside the optimizer's step. A step's
folder is *complete* for generation g when every member of g has a ``.json`` of that step and of
generation g there: those states were taken at the same step of one generation, i.e. one consistent
world (a member wrote its file only after its step, so every mix of that step had arrived). A folder
may hold files of two generations (the survivors repeat steps after a change and overwrite theirs);
the newest complete generation counts. Each member keeps its newest :data:`KEEP` files.

:func:`resume` (``resume: true`` with ``elastic.enabled``) loads the newest complete step, the same on
every member: the run must have as many workers as that generation had members, and the new member
at rank r takes the state of the old generation's rank r, including its data shard (the member id and
launch size it trained with), so the resumed run goes on as that generation would have. A file that
is missing, truncated or of another step or generation moves every member to the next older
complete step, naming the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lookahead_dist.errors import CheckpointError
from lookahead_dist.train.checkpoint import first_complete, load_file, load_into
from lookahead_dist.train.rundir import atomic_write, write_text

__all__ = ["KEEP", "complete_steps", "resume", "save"]

#: How many checkpoint files each member keeps (its newest).
KEEP = 3
_FOLDER = re.compile(r"elastic_step_(\d+)$")
_MEMBER = re.compile(r"member_(\d+)\.json$")
_KEYS = ("step", "member", "generation", "members", "shard", "model", "optimizer")


def _folder(ckdir: Path, step: int) -> Path:
    return ckdir / f"elastic_step_{step:08d}"


def save(run: Path, el, model, step: int, shard: tuple[int, int]) -> None:
    """This member's checkpoint of ``step`` (its .pt, then its .json); older files of its own beyond KEEP go."""
    ckdir = run / "checkpoints"
    folder = _folder(ckdir, step)
    folder.mkdir(parents=True, exist_ok=True)
    view = el.view
    head = {"step": step, "member": el.member, "generation": view.generation, "members": list(view.members)}
    state = dict(head, shard=list(shard), model=model.state_dict(), optimizer=el.opt.state_dict())
    atomic_write(folder / f"member_{el.member}.pt", lambda p: torch.save(state, p))
    write_text(folder / f"member_{el.member}.json", json.dumps(head))
    mine = sorted(s for s, _ in _folders(ckdir) if (_folder(ckdir, s) / f"member_{el.member}.json").exists())
    for old in mine[:-KEEP]:
        for suffix in (".json", ".pt"):  # the .json first: a .pt without it is never read
            (_folder(ckdir, old) / f"member_{el.member}{suffix}").unlink(missing_ok=True)
        try:
            _folder(ckdir, old).rmdir()
        except OSError:  # other members' files are still there
            pass


def _folders(ckdir: Path) -> list[tuple[int, Path]]:
    found = ((_FOLDER.match(p.name), p) for p in ckdir.glob("elastic_step_*") if p.is_dir())
    return sorted(((int(m.group(1)), p) for m, p in found if m), reverse=True)


def complete_steps(ckdir: Path) -> list[tuple[int, int, tuple[int, ...]]]:
    """``(step, generation, members)`` of every complete checkpoint in ``ckdir``, newest first."""
    out = []
    for step, folder in _folders(ckdir):
        heads = {}
        for p in folder.glob("member_*.json"):
            m = _MEMBER.match(p.name)
            try:
                head = json.loads(p.read_text())
            except (OSError, ValueError):
                continue  # unreadable: its member counts as missing
            if m and isinstance(head, dict) and head.get("step") == step and head.get("member") == int(m.group(1)):
                heads[head["member"]] = head
        for g in sorted({h.get("generation") for h in heads.values() if isinstance(h.get("generation"), int)})[::-1]:
            members = next(tuple(h["members"]) for h in heads.values() if h["generation"] == g)
            if all(m in heads and heads[m]["generation"] == g for m in members):
                out.append((step, g, members))
                break
    return out


def _read(path: Path, step: int, generation: int, member: int) -> dict:
    state = load_file(path, _KEYS, "an elastic member checkpoint")
    got = (state["step"], state["generation"], state["member"])
    if got != (step, generation, member):
        raise CheckpointError(
            f"checkpoint file {path} holds step {got[0]} of generation {got[1]} (member {got[2]}), expected step "
            f"{step} of generation {generation} (member {member}): it was overwritten after its .json"
        )
    return state


def resume(run: Path, el, model) -> tuple[int, tuple[int, int]]:
    """Load the newest complete checkpoint into ``model`` and ``el``; return (its step, this member's shard)."""
    ckdir = run / "checkpoints"
    comm = el.opt.comm
    seen = comm.all_gather_object(complete_steps(ckdir))
    agreed = [c for c in seen[0] if all(c in s for s in seen[1:])]  # what every member can read
    if not agreed:
        raise CheckpointError(f"resume: no elastic checkpoint in {ckdir} is complete (every member of one generation)")
    step, generation, members = agreed[0]
    if len(members) != el.world_size:
        raise CheckpointError(
            f"resume: the newest complete checkpoint in {ckdir}, step {step} of generation {generation}, holds the "
            f"states of {len(members)} member(s) {list(members)}; this run has {el.world_size}: launch "
            f"{len(members)} worker(s) (--nproc_per_node/--nnodes) to resume it"
        )
    agreed = [c for c in agreed if len(c[2]) == el.world_size]  # older ones to fall back to: of this size

    def path_of(candidate) -> Path:
        step, _, members = candidate
        return _folder(ckdir, step) / f"member_{members[el.rank]}.pt"

    def read(candidate) -> dict:
        step, generation, members = candidate
        return _read(path_of(candidate), step, generation, members[el.rank])

    chosen, state, problems = first_complete(comm, agreed, read)
    if state is None:
        raise CheckpointError(f"resume: no checkpoint in {ckdir} could be read by every member: {'; '.join(problems)}")
    if problems and el.rank == 0:
        print(f"[train] resume: skipped newer checkpoint(s): {'; '.join(problems)}", flush=True)
    load_into(
        path_of(chosen),
        state,
        lambda st: model.load_state_dict(st["model"]),
        lambda st: el.load_state_dict(st["optimizer"]),
    )
    return int(state["step"]), (int(state["shard"][0]), int(state["shard"][1]))
