"""Per-run locks: distinct names and subnets for concurrent runs, and safe removal of a killed run's leftovers.

Each run holds ``/run/lookahead_dist_cluster/<run id>.lock`` under an
exclusive ``flock`` for its whole life; the file records the run's subnet and
pid. The kernel drops the lock when the process dies, however it dies, so at
start a run can tell a live run (lock held) from a dead one (lock free):

- a lock file whose lock it can take belongs to a dead run: that run's
  namespaces (``ldc-<run id>-*``) and the processes left in them are removed,
  then the file;
- a namespace ``ldc-<run id>-*`` without any lock file is an orphan (a run
  creates and locks its file before its first namespace) and is removed.

A new lock file is written and locked under a temporary name and only then
renamed into place, so no other run can ever take it for a dead run's.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import secrets
from dataclasses import dataclass

from lookahead_dist.cluster.netns import PREFIX, remove_namespaces, run_namespaces

__all__ = ["LOCK_DIR", "RunLock", "clean_leftovers", "acquire"]

LOCK_DIR = "/run/lookahead_dist_cluster"


@dataclass
class RunLock:
    """A held run lock: the run id, its subnet (10.A.B.0/24), and the open, flocked file."""

    run_id: str
    subnet: tuple[int, int]
    path: str
    fd: int

    def release(self) -> None:
        """Remove the lock file, then drop the lock (the namespaces must be gone by now)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)


def _live_runs(lock_dir: str) -> dict[str, tuple[int, int] | None]:
    """run id -> subnet of every lock file (live or not: a dead one is about to go)."""
    out: dict[str, tuple[int, int] | None] = {}
    for name in os.listdir(lock_dir):
        if name.endswith(".lock") and not name.startswith("."):
            try:
                with open(os.path.join(lock_dir, name)) as f:
                    out[name[:-5]] = tuple(json.load(f)["subnet"])
            except (OSError, ValueError, KeyError, TypeError):
                out[name[:-5]] = None
    return out


def clean_leftovers(lock_dir: str = LOCK_DIR, log=None) -> list[str]:
    """Remove the namespaces (and processes in them) of runs that died; never touch a live run's.

    Returns the run ids cleaned.
    """
    os.makedirs(lock_dir, exist_ok=True)
    cleaned = []
    for run_id in sorted(_live_runs(lock_dir)):
        path = os.path.join(lock_dir, f"{run_id}.lock")
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live run holds it
            os.close(fd)
            continue
        try:
            left = run_namespaces(run_id)
            if log and left:
                log(f"removing {len(left)} namespace(s) left by the dead run {run_id}")
            failed = remove_namespaces(left)
            if not failed:
                os.unlink(path)
                cleaned.append(run_id)
        finally:
            os.close(fd)
    # namespaces first, lock files second: a run that locks its file after this listing of
    # lock files created its namespaces after the listing of namespaces, so it is never an orphan here
    names = run_namespaces()
    locked = set(_live_runs(lock_dir))
    orphans: dict[str, list[str]] = {}
    for ns in names:
        run_id = ns[len(PREFIX) :].rsplit("-", 1)[0]
        if run_id not in locked:
            orphans.setdefault(run_id, []).append(ns)
    for run_id, names in sorted(orphans.items()):
        if log:
            log(f"removing {len(names)} namespace(s) of run {run_id}, which has no lock file")
        remove_namespaces(names)
        cleaned.append(run_id)
    for name in os.listdir(lock_dir):  # a run killed between creating its lock file and renaming it
        if name.startswith(".") and name.endswith(".tmp"):
            try:
                fd = os.open(os.path.join(lock_dir, name), os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(os.path.join(lock_dir, name))
            except (BlockingIOError, FileNotFoundError):
                pass
            finally:
                os.close(fd)
    return cleaned


def acquire(lock_dir: str = LOCK_DIR) -> RunLock:
    """Take a fresh run id and a subnet that no other run's lock file records, and lock them for this run."""
    os.makedirs(lock_dir, exist_ok=True)
    taken = _live_runs(lock_dir)
    used = {s for s in taken.values() if s}
    rng = random.Random(secrets.randbits(64))
    while True:
        run_id = secrets.token_hex(3)
        if run_id not in taken and not run_namespaces(run_id):
            break
    while True:
        subnet = (rng.randrange(64, 192), rng.randrange(0, 256))
        if subnet not in used:
            break
    tmp = os.path.join(lock_dir, f".{run_id}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, json.dumps({"run_id": run_id, "subnet": list(subnet), "pid": os.getpid()}).encode())
    path = os.path.join(lock_dir, f"{run_id}.lock")
    os.rename(tmp, path)
    return RunLock(run_id=run_id, subnet=subnet, path=path, fd=fd)
