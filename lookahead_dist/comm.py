"""Every call to torch.distributed in the library goes through this module.

Length: over 500 lines, kept whole on purpose: it is the one place that calls torch.distributed, and the
error translation, the heartbeats and the clean-exit rules below hold for every primitive in it.

It gives the engine a handful of primitives (weighted all-reduce over a group,
batched point-to-point exchange, object gathers for start-up checks), turns a
low-level failure into a :class:`~lookahead_dist.errors.CommError` that names
the lost peer's rank, and keeps a heartbeat in the process group's store so
that the rank of a dead peer is known even where the backend reports only an
address (gloo does).

A clean exit. The heartbeat threads are daemons that call into the store with
the GIL released; one still inside such a call when the interpreter finalizes
is killed by ``pthread_exit`` from a C++ destructor, which aborts the process
("terminate called without an active exception", pytorch/pytorch#38228). So
every heartbeat stops when its :class:`Comm` is closed or collected, when the
default group is destroyed, and at the latest in an ``atexit`` hook that joins
them all before finalization starts. The same hook frees a destroyed group that
torch still holds (see :func:`release_destroyed_groups`), whose gloo threads
would otherwise abort the process the same way.
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist

from lookahead_dist.errors import CommError

__all__ = [
    "Comm",
    "Pending",
    "connect_store",
    "drain_in_flight",
    "init_process_group",
    "destroy_process_group",
    "default_backend",
    "is_initialized",
    "prefix_store",
    "release_destroyed_groups",
    "stop_heartbeats",
]

_HB_PREFIX = "lookahead_dist/heartbeat/"
# What a failed collective raises (DistBackendError is a RuntimeError where torch has it).
_BACKEND_ERRORS = (RuntimeError, getattr(dist, "DistBackendError", RuntimeError))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def default_backend(device: torch.device | None = None) -> str:
    """NCCL when CUDA is usable (and the device is a GPU), gloo otherwise."""
    if device is not None and torch.device(device).type != "cuda":
        return "gloo"
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def _import_before_any_group() -> None:
    """Import torch.distributed.nn while no process group exists, if none does yet.

    torch.distributed.nn.functional writes ``group=group.WORLD`` as a default
    argument of ten functions, so importing it while a default group exists
    stores that group in the functions' defaults, and the group (its gloo
    threads and sockets) then outlives ``destroy_process_group`` until the
    interpreter exits (seen with torch 2.13). torch imports it with torch._dynamo,
    which torch.optim imports when the first optimizer is built, usually after
    ``init_process_group``. Imported here first, the defaults hold None.
    """
    if dist.is_available() and not dist.is_initialized():
        try:
            import torch.distributed.nn  # noqa: F401
        except ImportError:
            pass


_import_before_any_group()


def release_destroyed_groups() -> None:
    """Drop the destroyed process groups that torch.distributed.nn.functional still holds in its defaults.

    Where that module was imported while a group existed (lookahead_dist imported after
    ``init_process_group``), its defaults keep the group, with its gloo worker threads, alive past
    ``destroy_process_group``. Left to interpreter finalization, a worker thread that frees its last
    work's tensors there needs the GIL and aborts the process ("terminate called without an active
    exception"). A destroyed group in those defaults is replaced by None, the value they hold when the
    module is imported before any group; the group is then freed here, in the calling thread.
    Runs at exit and in :func:`destroy_process_group`.
    """
    mod = sys.modules.get("torch.distributed.nn.functional")
    if mod is None or not dist.is_available():
        return
    live = {id(pg) for pg in dist.distributed_c10d._world.pg_map} if is_initialized() else set()

    def stale(v) -> bool:
        return isinstance(v, dist.ProcessGroup) and id(v) not in live

    for fn in list(vars(mod).values()):
        if getattr(fn, "__module__", None) != mod.__name__ or not getattr(fn, "__defaults__", None):
            continue
        if any(stale(v) for v in fn.__defaults__):
            fn.__defaults__ = tuple(None if stale(v) else v for v in fn.__defaults__)


def init_process_group(backend: str | None = None, timeout_s: float = 300.0, **kw) -> None:
    """Initialise from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) unless already done."""
    if is_initialized():
        return
    _import_before_any_group()
    backend = backend or default_backend()
    if backend == "nccl" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    timeout = datetime.timedelta(seconds=timeout_s)
    if "store" not in kw and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent keeps one store across restarts of the worker group; without a prefix per
        # attempt a restarted group reads the dead group's addresses and hangs or is refused in connect.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
        )
        kw.update(
            store=dist.PrefixStore(f"lookahead_dist/attempt_{attempt}", store),
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
        )
    dist.init_process_group(backend=backend, timeout=timeout, **kw)


def init_single_process_group(backend: str = "gloo", timeout_s: float = 300.0) -> None:
    """A 1-rank group in this process (no torchrun), so that the same code runs without launching."""
    init_process_group(backend, timeout_s=timeout_s, store=dist.HashStore(), rank=0, world_size=1)


def host_store(timeout_s: float = 60.0):
    """A TCP store served by this process on a free loopback port (``.port``), for a local process group."""
    return dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s)
    )


def connect_store(host: str, port: int, timeout_s: float = 60.0, is_master: bool = False):
    """A TCP store client of ``host:port`` (or its server when ``is_master``; port 0: a free one, ``.port``)."""
    return dist.TCPStore(
        host, int(port), is_master=is_master, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s)
    )


def prefix_store(prefix: str, store, own_connection: bool = False):
    """``store`` seen under ``prefix/``; ``own_connection``: over a new connection (for another thread)."""
    return dist.PrefixStore(prefix, store.clone() if own_connection else store)


def join_local_group(port: int, rank: int, world_size: int, backend: str = "gloo", timeout_s: float = 60.0) -> None:
    """Join the group whose store :func:`host_store` serves on ``port`` of this machine."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    _import_before_any_group()
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def world_size() -> int:
    """The default group's size (1 without a group)."""
    return dist.get_world_size() if is_initialized() else 1


def destroy_process_group() -> None:
    """Wait for in-flight communication, stop every heartbeat of this process, then destroy every process group."""
    drain_in_flight()
    stop_heartbeats()
    if is_initialized():
        dist.destroy_process_group()
    release_destroyed_groups()


class _Heartbeat(threading.Thread):
    """Bumps this rank's counter in the store every ``interval`` seconds, until stopped or the group is gone."""

    def __init__(self, store, rank: int, interval: float):
        super().__init__(daemon=True, name=f"lookahead_dist-heartbeat-{rank}")
        self.store, self.key, self.interval = store, f"{_HB_PREFIX}{rank}", interval
        self._stop_event = threading.Event()  # not _stop: Thread._stop is a method

    def run(self) -> None:
        while not self._stop_event.is_set() and is_initialized():
            try:
                self.store.add(self.key, 1)
            except Exception:  # the store host is gone: nothing left to report to
                return
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()


# Every heartbeat thread started in this process and not yet finished.
_HEARTBEATS: weakref.WeakSet[_Heartbeat] = weakref.WeakSet()


def _stop_heartbeat(hb: _Heartbeat, timeout: float) -> None:
    hb.stop()
    if hb.is_alive() and hb is not threading.current_thread():
        hb.join(timeout)


def stop_heartbeats(timeout: float = 5.0) -> None:
    """Stop every heartbeat thread of this process and wait (up to ``timeout`` seconds in all) until each ends.

    Runs at interpreter exit (``atexit``), before finalization, so that no heartbeat is inside a store call
    when the interpreter finalizes; :func:`destroy_process_group` calls it too.
    """
    beats = list(_HEARTBEATS)
    for hb in beats:
        hb.stop()
    deadline = time.monotonic() + timeout
    for hb in beats:
        _stop_heartbeat(hb, max(0.0, deadline - time.monotonic()))


class _AllReduceText:
    """ "all-reduce over ranks [...]", written only when an error needs it (a group may hold 65,536 ranks)."""

    def __init__(self, ranks):
        self.ranks = ranks

    def __str__(self) -> str:
        r = list(self.ranks)
        shown = r if len(r) <= 16 else f"[{r[0]}, {r[1]}, ..., {r[-1]}] ({len(r)} ranks)"
        return f"all-reduce over ranks {shown}"


class Pending:
    """Communication in flight: the work handles of non-blocking collectives or point-to-point operations.

    :meth:`wait` blocks until every operation is done (on NCCL: until the current CUDA
    stream waits for them) and turns a backend failure into a :class:`CommError`
    that names the lost peer, as the blocking primitives do. It is idempotent.
    Until it has run, the tensors being sent must not change and the tensors being
    received must not be read.
    """

    def __init__(self, comm: Comm, works: list, what: str, peers: Sequence[int] | None):
        self.comm, self.what, self.peers = comm, what, peers  # read only when an error is reported
        self._works = list(works)
        if self._works:
            _IN_FLIGHT.add(self)

    @property
    def done(self) -> bool:
        return not self._works

    @classmethod
    def merge(cls, comm: Comm, what: str, peers: Sequence[int] | None, parts: Sequence[Pending]) -> Pending:
        """One handle for the operations of ``parts`` (which are left empty)."""
        works = []
        for part in parts:
            works += part._works
            part._works = []
            _IN_FLIGHT.discard(part)
        return cls(comm, works, what, peers)

    def wait(self) -> None:
        works, self._works = self._works, []
        _IN_FLIGHT.discard(self)
        if works:
            with self.comm.guard(self.what, self.peers):
                for w in works:
                    w.wait()


# Every Pending of this process whose operations have not been waited for, held strongly: a work
# handle dropped before it is waited for frees the buffers its transfer still writes into, and the
# group's next operations then hang (seen with gloo). Waiting removes it.
_IN_FLIGHT: set[Pending] = set()


def drain_in_flight(comm: Comm | None = None) -> None:
    """Wait for every operation still in flight in this process (of ``comm`` only, if given).

    Runs before a group is destroyed and at exit. A failure is swallowed here:
    teardown goes on, and the step that would have read the result is never taken.
    """
    for pending in list(_IN_FLIGHT):
        if comm is None or pending.comm is comm:
            try:
                pending.wait()
            except Exception:
                pass


def _at_exit() -> None:
    drain_in_flight()
    stop_heartbeats()
    release_destroyed_groups()


atexit.register(_at_exit)


class Comm:
    """The process group as the engine sees it: rank, world, groups, collectives, failure reports.

    ``heartbeat`` (seconds, 0 to disable) keeps a per-rank counter in the
    default store; when a collective fails, the ranks whose counter stopped
    are named in the error.
    """

    def __init__(self, heartbeat: float = 0.5):
        if not is_initialized():
            raise CommError(
                "torch.distributed is not initialised: launch with torchrun (or call "
                "lookahead_dist.comm.init_process_group()) before building a distributed optimizer"
            )
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.backend = dist.get_backend()
        self._groups: dict[tuple[tuple[int, ...], str], Any] = {}
        self._seen: dict[tuple[tuple[int, ...], str], Any] = {}
        self._hb = None
        self._hb_interval = heartbeat
        self._store = None
        if heartbeat > 0:
            try:
                self._store = dist.distributed_c10d._get_default_store()
            except Exception:
                self._store = None
            if self._store is not None:
                self._hb = _Heartbeat(self._store, self.rank, heartbeat)
                _HEARTBEATS.add(self._hb)
                self._hb.start()
                # Stop the thread when this Comm is collected (the thread holds no reference to it).
                self._hb_finalizer = weakref.finalize(self, _Heartbeat.stop, self._hb)

    def close(self, timeout: float = 5.0) -> None:
        """Wait for this Comm's in-flight communication, then stop its heartbeat and wait (up to ``timeout``
        seconds) until its thread ends. Idempotent."""
        drain_in_flight(self)
        if self._hb is not None:
            hb, self._hb = self._hb, None
            self._hb_finalizer.detach()
            _stop_heartbeat(hb, timeout)

    def __enter__(self) -> Comm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- groups -----------------------------------------------------------------
    def group(self, ranks: Sequence[int], channel: str = ""):
        """The process group over ``ranks`` (None = the whole world's default group).

        ``channel`` names a group of its own over the same ranks (the whole world
        included), so that its collectives are not queued behind another
        channel's: SlowMo's overlapped slow step all-reduces on ``"slow"`` while
        the gossip runs on the default channel. Must be called by every rank, for
        the same rank sets and channels in the same order.
        """
        fast = (ranks, channel) if isinstance(ranks, tuple) else None  # plans pass tuples: O(1) once seen
        if fast is not None and fast in self._seen:
            return self._seen[fast]
        key = tuple(sorted(int(r) for r in ranks))
        if key == tuple(range(self.world_size)) and not channel:
            group = None
        else:
            if (key, channel) not in self._groups:
                self._groups[(key, channel)] = dist.new_group(list(key))
            group = self._groups[(key, channel)]
        if fast is not None:
            self._seen[fast] = group
        return group

    # -- failure translation ----------------------------------------------------
    def _counters(self) -> dict[int, int]:
        out = {}
        for r in range(self.world_size):
            try:
                out[r] = int(self._store.add(f"{_HB_PREFIX}{r}", 0))
            except Exception:
                out[r] = -1
        return out

    def lost_peers(self, candidates: Iterable[int] | None = None) -> list[int]:
        """Ranks whose heartbeat stopped (waits about three heartbeat intervals)."""
        if self._store is None:
            return []
        cands = sorted(set(candidates) if candidates is not None else range(self.world_size))
        cands = [r for r in cands if r != self.rank]
        try:
            before = self._counters()
            time.sleep(3 * self._hb_interval + 0.1)
            after = self._counters()
        except Exception:
            return []
        return [r for r in cands if after.get(r, -1) == before.get(r, -1)]

    @contextmanager
    def guard(self, what: str, peers: Iterable[int] | None = None):
        """Run a communication step; a backend failure becomes a CommError naming the lost rank(s)."""
        try:
            yield
        except CommError:
            raise
        except _BACKEND_ERRORS as exc:
            peers = list(peers) if peers is not None else None
            lost = self.lost_peers(peers)
            if not lost and peers is not None:
                lost = [r for r in self.lost_peers(None)]
            who = (
                f"lost peer rank(s) {lost}"
                if lost
                else f"no peer was found dead (peers of this step: {peers if peers is not None else 'all'})"
            )
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CommError(f"rank {self.rank}: {what} failed: {who}; backend said: {first}") from exc

    # -- primitives -------------------------------------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor, ranks: Sequence[int]) -> None:
        with self.guard(_AllReduceText(ranks), ranks):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group(ranks))

    def start_all_reduce_sum(self, tensor: torch.Tensor, ranks: Sequence[int], channel: str = "") -> Pending:
        """Start an all-reduce SUM of ``tensor`` in place over ``ranks``; the result is there after ``wait()``."""
        what = _AllReduceText(ranks)
        with self.guard(what, ranks):
            work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group(ranks, channel), async_op=True)
        return Pending(self, [work], what, ranks)

    def exchange(
        self,
        sends: Sequence[tuple[int, torch.Tensor]],
        recvs: Sequence[tuple[int, torch.Tensor]],
    ) -> None:
        """Send each (peer, tensor) and receive into each (peer, tensor), batched, then wait for all.

        Every receive is posted before any send: posted the other way round, a
        peer's data can wait for its receive to be posted behind our own sends,
        and the two directions of an exchange then run one after the other
        instead of at once (twice the time on a link that is the bottleneck).
        """
        self.start_exchange(sends, recvs).wait()

    def start_exchange(
        self,
        sends: Sequence[tuple[int, torch.Tensor]],
        recvs: Sequence[tuple[int, torch.Tensor]],
    ) -> Pending:
        """Post every receive, then every send (see :meth:`exchange`), and return without waiting."""
        ops = [dist.P2POp(dist.irecv, t, peer) for peer, t in recvs]
        ops += [dist.P2POp(dist.isend, t, peer) for peer, t in sends]
        peers = sorted({p for p, _ in sends} | {p for p, _ in recvs})
        what = f"neighbour exchange with ranks {peers}"
        if not ops:
            return Pending(self, [], what, peers)
        with self.guard(what, peers):
            works = dist.batch_isend_irecv(ops)
        return Pending(self, works, what, peers)

    def reduce_scatter_sum(self, out: torch.Tensor, full: torch.Tensor) -> None:
        """out <- rank r's chunk of the SUM over ranks of ``full`` (``full`` = world_size chunks of out's size)."""
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        with self.guard("reduce-scatter"):
            fn(out, full, op=dist.ReduceOp.SUM)

    def all_gather_into(self, full: torch.Tensor, chunk: torch.Tensor, ranks: Sequence[int] | None = None) -> None:
        """full <- the concatenation of every rank's ``chunk`` (of ``ranks``, default all), in rank order."""
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        with self.guard("all-gather" if ranks is None else f"all-gather over ranks {list(ranks)}", ranks):
            fn(full, chunk, group=None if ranks is None else self.group(ranks))

    def all_reduce_max(self, tensor: torch.Tensor, ranks: Sequence[int]) -> None:
        """tensor <- its element-wise MAX over ``ranks``, in place."""
        with self.guard(f"max all-reduce over ranks {list(ranks)}", ranks):
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group(ranks))

    def all_to_all_single(self, out: torch.Tensor, inp: torch.Tensor, ranks: Sequence[int]) -> None:
        """Chunk j of ``inp`` goes to the j-th rank of ``ranks`` (in rank order); chunk j of ``out`` comes from it."""
        with self.guard(f"all-to-all over ranks {list(ranks)}", ranks):
            dist.all_to_all_single(out, inp, group=self.group(ranks))

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        with self.guard("all_gather_object"):
            dist.all_gather_object(out, obj)
        return out

    def all_reduce_flag(self, flag: bool) -> bool:
        """True on every rank iff ``flag`` is true on any rank (a collective decision)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device_for_collectives())
        with self.guard("flag all-reduce"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        with self.guard("barrier"):
            dist.barrier()

    def device_for_collectives(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # -- start-up checks --------------------------------------------------------
    def check_world_size(self, expected: int, source: str) -> None:
        """Fail on every rank, before any communication, when the topology needs another world size."""
        if expected != self.world_size:
            raise CommError(
                f"{source}: the topology places its agents on {expected} rank(s) but the process group "
                f"has world size {self.world_size}; launch with --nproc_per_node/--nnodes giving {expected} "
                f"processes, or use a topology for {self.world_size}"
            )

    def check_same(self, value: str, what: str) -> None:
        """Every rank must hold the same ``value`` (e.g. a schedule hash); name the ranks that differ."""
        values = self.all_gather_object(value)
        if len(set(values)) > 1:
            ref = values[0]
            differ = [r for r, v in enumerate(values) if v != ref]
            raise CommError(
                f"rank {self.rank}: ranks loaded different {what}: rank(s) {differ} differ from rank 0 "
                f"({ref[:12]}... vs {[values[r][:12] for r in differ]}); every rank must load the same file"
            )
