"""Spawn a real gloo process group on this machine (CPU), for checks and tests.

:func:`spawn` starts ``world_size`` processes, each in a gloo group, runs a
function in each and returns what each returned. The TCP store is hosted by the
calling process, so it survives the death of any rank. Each rank's return
value comes back through a file; an exception in a rank comes back as its
traceback text.

>>> def hello(rank, world_size):                      # doctest: +SKIP
...     return rank
>>> spawn(hello, 2)                                   # doctest: +SKIP
[0, 1]
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp

from lookahead_dist import comm


class SpawnError(RuntimeError):
    """One or more spawned ranks failed; the message holds their tracebacks."""


def _entry(fn, rank, world_size, port, out_dir, timeout_s, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    result = ("error", "did not finish")
    try:
        comm.join_local_group(port, rank, world_size, "gloo", timeout_s)
        result = ("ok", fn(rank, world_size, *args))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the test
        result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        try:
            comm.destroy_process_group()
        except Exception:
            pass


_PRELOAD = [
    "torch",
    "torch.distributed",
    "torch._dynamo",
    "lookahead_dist.decentralized",
    "lookahead_dist.slowmo",
    "lookahead_dist.reference.simulate",
    "lookahead_dist.topology",
]


def _context():
    """A forkserver context (torch imported once in the server, then every rank is a cheap fork of it).

    The server never runs a kernel, so its children start with clean thread pools;
    where forkserver is not available (Windows, macOS defaults aside) plain spawn is used.
    """
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return mp.get_context("spawn")


def spawn(fn, world_size: int, *args, timeout: float = 240.0, op_timeout: float = 60.0, allow_errors: bool = False):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; return the per-rank results.

    ``fn`` must be importable (a module-level function). A rank that fails
    raises :class:`SpawnError` with every failing rank's traceback; with
    ``allow_errors`` each result is instead ("ok", value), ("error", text) or,
    for a rank that never wrote one (killed), ("dead", exit code). Ranks still
    running after ``timeout`` seconds are killed and ``TimeoutError`` is raised.
    """
    store = comm.host_store(op_timeout)
    out_dir = tempfile.mkdtemp(prefix="lookahead_dist-spawn-")
    ctx = _context()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, store.port, out_dir, op_timeout, args), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if hung:
        raise TimeoutError(f"ranks {hung} still running after {timeout} s")
    results = []
    for r, p in enumerate(procs):
        path = os.path.join(out_dir, f"{r}.pkl")
        if os.path.exists(path):
            with open(path, "rb") as f:
                results.append(pickle.load(f))
        else:
            results.append(("dead", p.exitcode))
    del store
    if not allow_errors:
        errors = [(r, res[1]) for r, res in enumerate(results) if res[0] != "ok"]
        if errors:
            raise SpawnError("\n".join(f"rank {r}: {msg}" for r, msg in errors))
        return [res[1] for res in results]
    return results
