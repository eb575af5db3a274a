"""Checkpoints of a run: one file per rank per checkpoint, a manifest written last, and a resume that every
rank agrees on.

::

    RUN/checkpoints/step_00000060/rank_0.pt     {"step", "rank", "world_size", "model", "optimizer",
    RUN/checkpoints/step_00000060/rank_1.pt      "torch_rng", "bytes_sent"}
    RUN/checkpoints/step_00000030/...           the previous checkpoint, kept for a fallback
    RUN/checkpoints/manifest.json               {"step": 60, "world_size": 2, "files": [...]}

Every file is written to a temporary name and moved into place; the manifest
is written after every rank's file is in place, so it names only a
checkpoint that was complete when it was written. The newest ``KEEP``
checkpoints stay on disk.

A resume tries the checkpoints newest first, from the one the manifest names
down: each rank reads its own file, and the ranks exchange what they found, so
that all of them load the same step, the newest one that is complete on
every rank. A file that is missing, truncated or corrupt, or that holds
another step or rank, is named in a log line (or, when no checkpoint is
complete, in the :class:`CheckpointError`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch

from lookahead_dist.comm import Comm
from lookahead_dist.errors import CheckpointError, LookaheadDistError
from lookahead_dist.train.rundir import atomic_write, write_text

__all__ = [
    "KEEP",
    "CheckpointError",
    "first_complete",
    "last_checkpoint",
    "load_file",
    "load_into",
    "read_rank_file",
    "resume",
    "save",
]

#: How many checkpoints stay on disk: the newest, and the ones a resume falls back to.
KEEP = 2
_KEYS = ("step", "rank", "world_size", "model", "optimizer", "torch_rng")
_FOLDER = re.compile(r"step_(\d+)$")


def _folder(step: int) -> str:
    return f"step_{step:08d}"


def _rank_file(step: int, rank: int) -> str:
    return f"{_folder(step)}/rank_{rank}.pt"


def _steps_on_disk(ckdir: Path) -> list[int]:
    found = (_FOLDER.match(p.name) for p in ckdir.glob("step_*") if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def save(run: Path, step: int, comm: Comm, model, opt, bytes_sent: int) -> None:
    """Every rank writes its file of checkpoint ``step``; then rank 0 writes the manifest and removes all but
    the newest ``KEEP`` checkpoints (and any newer one, left by an attempt that did not finish)."""
    ckdir = run / "checkpoints"
    folder = ckdir / _folder(step)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "rank": comm.rank,
        "world_size": comm.world_size,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "bytes_sent": bytes_sent,
    }
    atomic_write(folder / f"rank_{comm.rank}.pt", lambda p: torch.save(state, p))
    comm.barrier()  # every rank's file is in place before the manifest names them
    if comm.rank == 0:
        files = [_rank_file(step, r) for r in range(comm.world_size)]
        manifest = {"step": step, "world_size": comm.world_size, "files": files}
        write_text(ckdir / "manifest.json", json.dumps(manifest, indent=1))
        steps = _steps_on_disk(ckdir)
        keep = [s for s in steps if s <= step][-KEEP:]
        for old in steps:
            if old not in keep:
                old_dir = ckdir / _folder(old)
                for f in old_dir.iterdir():
                    f.unlink()
                old_dir.rmdir()
    comm.barrier()


def _read_manifest(ckdir: Path) -> tuple[Optional[dict], Optional[str]]:
    """(manifest, None), or (None, why it cannot be used)."""
    path = ckdir / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except OSError as exc:
        return None, f"no readable checkpoint manifest at {path} ({exc.strerror or exc})"
    except ValueError as exc:
        return None, f"the checkpoint manifest {path} is corrupt ({exc})"
    ok = (
        isinstance(manifest, dict)
        and isinstance(manifest.get("step"), int)
        and isinstance(manifest.get("world_size"), int)
        and isinstance(manifest.get("files"), list)
    )
    if not ok:
        return None, f"the checkpoint manifest {path} is corrupt (expected step, world_size and files: {manifest!r})"
    return manifest, None


def last_checkpoint(run: Path) -> str:
    """A line for an error message: which checkpoint a rerun with --resume starts from."""
    manifest, _ = _read_manifest(run / "checkpoints")
    if manifest is None:
        return "no checkpoint was written"
    return f"last good checkpoint: step {manifest['step']} in {run / 'checkpoints'}"


def load_file(path: Path, keys, kind: str) -> dict:
    """The dict saved in one checkpoint file, or a :class:`CheckpointError` that names the file: missing,
    truncated or corrupt, or not ``kind`` (a key of ``keys`` is missing)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load fails in many ways on a damaged file
        raise CheckpointError(
            f"checkpoint file {path} is truncated or corrupt ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if not isinstance(state, dict) or any(k not in state for k in keys):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint file {path} is not {kind} (expected keys {list(keys)}, got {got})")
    return state


def read_rank_file(path: Path, step: int, rank: int, world_size: int) -> dict:
    """The state in one rank's checkpoint file, or a :class:`CheckpointError` that names the file: missing,
    truncated or corrupt, not a checkpoint of this trainer, or holding another step, rank or world size."""
    state = load_file(path, _KEYS, "a checkpoint of this trainer")
    got = (state["step"], state["rank"], state["world_size"])
    if got != (step, rank, world_size):
        raise CheckpointError(
            f"checkpoint file {path} holds step {got[0]} of rank {got[1]} of {got[2]}, expected "
            f"step {step} of rank {rank} of {world_size}"
        )
    return state


def first_complete(comm: Comm, candidates, read) -> tuple[object, Optional[dict], list[str]]:
    """The first of ``candidates`` whose file ``read(candidate)`` reads whole on every rank (each rank its own):
    (that candidate, this rank's state, the problems of the candidates before it); (None, None, problems) if none."""
    problems: list[str] = []
    for candidate in candidates:
        try:
            state, err = read(candidate), None
        except CheckpointError as exc:
            state, err = None, str(exc)
        errors = [e for e in comm.all_gather_object(err) if e]
        if not errors:
            return candidate, state, problems
        problems += errors
    return None, None, problems


def load_into(path: Path, state: dict, *loads) -> None:
    """Call each of ``loads`` with ``state``; what does not fit is a :class:`CheckpointError` naming the file."""
    try:
        for load in loads:
            load(state)
    except LookaheadDistError:
        raise
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"resume: checkpoint file {path} does not fit this run's model or optimizer ({type(exc).__name__}: {exc})"
        ) from None


def resume(run: Path, comm: Comm, model, opt) -> tuple[int, int]:
    """Load the newest checkpoint that is complete on every rank; return (its step, bytes sent until then).

    Every rank reaches the same decision: the candidate steps (the manifest's and the older ones on disk)
    are agreed on first, and each candidate is taken only when every rank has read its file whole.
    """
    ckdir = run / "checkpoints"
    manifest, why = _read_manifest(ckdir)
    if manifest is not None and manifest["world_size"] != comm.world_size:
        raise CheckpointError(
            f"resume: {ckdir / 'manifest.json'} was written by {manifest['world_size']} "
            f"rank(s), this run has {comm.world_size}"
        )
    mine = set(_steps_on_disk(ckdir))
    if manifest is not None:
        mine = {s for s in mine if s <= manifest["step"]} | {manifest["step"]}
    candidates = sorted(set().union(*map(set, comm.all_gather_object(sorted(mine)))), reverse=True)

    def rel(step: int) -> str:
        if manifest is not None and step == manifest["step"] and comm.rank < len(manifest["files"]):
            return manifest["files"][comm.rank]
        return _rank_file(step, comm.rank)

    def read(step: int) -> dict:
        return read_rank_file(ckdir / rel(step), step, comm.rank, comm.world_size)

    step, state, problems = first_complete(comm, candidates, read)
    problems = ([why] if why and candidates else []) + problems
    if state is None:
        detail = "; ".join(problems) if problems else why or f"no checkpoint in {ckdir}"
        raise CheckpointError(f"resume: no checkpoint in {ckdir} is complete on every rank: {detail}")
    if problems and comm.rank == 0:
        print(f"[train] resume: skipped newer checkpoint(s): {'; '.join(problems)}", flush=True)
    load_into(
        ckdir / rel(step),
        state,
        lambda st: model.load_state_dict(st["model"]),
        lambda st: opt.load_state_dict(st["optimizer"]),
        lambda st: torch.set_rng_state(st["torch_rng"]),
    )
    return int(state["step"]), int(state.get("bytes_sent", 0))
