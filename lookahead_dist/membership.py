"""Elastic membership: which workers are in the job now, agreed through the store, and their process group.

A job's workers are *members*, each with a stable id (its launch rank) and an
incarnation (how often its launcher restarted it). The members of one
*generation* g share one process group, formed on the store prefix of g. When a
member is lost (or a restarted one asks to join), the members of g move to
g + 1 together:

1. **Detection.** A failed collective raises :class:`~lookahead_dist.errors.CommError`
   on the dead member's neighbours. The first to see it sets the flag of g in the
   store and destroys its own group at once, so that its neighbours' next
   communication fails too (in gossip only a dead rank's neighbours see the
   death); every member checks the flag at each step, so even a member that sends
   nothing (local SGD between slow steps) learns within one step.
2. **Arrival.** Each member destroys its group, then writes its arrival for g
   (the step it has completed and the oldest step it can roll back to).
3. **Agreement.** A member of g is *dead* when its launcher wrote so (the
   supervisor sees the exit at once) or when its heartbeat counter in the store
   has not moved for ``dead_after`` seconds. Once every member of g has arrived or
   is dead, any member proposes g + 1: the arrived members, the pending joiners,
   and the step s = the smallest step among the arrived. The proposal is written
   with the store's compare-and-set: the first write wins, and every member reads
   that one value, so all decide the same even when two die at once.
4. **New group.** The members of g + 1 (ranks in id order) form a group on the
   prefix of g + 1. If that fails (one more died meanwhile), they go on from g + 1
   to g + 2 the same way.

A restarted worker asks to join (``join`` list in the store) and waits for a
generation that includes it; the members move to it at their next sync point
(:mod:`lookahead_dist.regroup` takes care of the state).

Store clients and process groups are made through :mod:`lookahead_dist.comm`
(:func:`~lookahead_dist.comm.connect_store` is re-exported here for the launcher).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field

from lookahead_dist import comm
from lookahead_dist.comm import connect_store
from lookahead_dist.errors import ConfigError, MembershipError

__all__ = ["ROOT", "MembershipError", "View", "Membership", "connect_store", "dead_key"]

#: Every key of the elastic protocol lives under this prefix of the job's store (``ROOT/key``).
ROOT = "lookahead_dist/elastic"


def dead_key(member: int, incarnation: int, root: bool = False) -> str:
    """The store key a launcher sets when it sees the member's process exit (``root``: with the ROOT prefix)."""
    return f"{ROOT}/dead/{member}.{incarnation}" if root else f"dead/{member}.{incarnation}"


def _leave_group() -> None:
    """Destroy this process's groups: their sockets close, so the peers' pending operations fail at once.

    The caller must hold no reference to the group (a traceback of its failure holds one in its frames).
    """
    comm.destroy_process_group()


@dataclass(frozen=True)
class View:
    """One generation: its members (ids in rank order), their incarnations and the step it starts from."""

    generation: int
    members: tuple[int, ...]
    incarnations: tuple[int, ...]
    step: int = 0
    joined: tuple[int, ...] = ()
    lost: tuple[int, ...] = ()
    reason: str = "start"
    joins_seen: int = 0

    @property
    def world_size(self) -> int:
        return len(self.members)

    def rank_of(self, member: int) -> int:
        return self.members.index(member)

    def to_json(self) -> str:
        return json.dumps(
            {
                "generation": self.generation,
                "members": list(self.members),
                "incarnations": list(self.incarnations),
                "step": self.step,
                "joined": list(self.joined),
                "lost": list(self.lost),
                "reason": self.reason,
                "joins_seen": self.joins_seen,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text) -> View:
        d = json.loads(text.decode() if isinstance(text, bytes) else text)
        return cls(
            d["generation"],
            tuple(d["members"]),
            tuple(d["incarnations"]),
            d["step"],
            tuple(d["joined"]),
            tuple(d["lost"]),
            d["reason"],
            d["joins_seen"],
        )


class _Beat(threading.Thread):
    """Bumps ``alive/{member}.{incarnation}`` every ``interval`` seconds on a store connection of its own."""

    def __init__(self, store, key: str, interval: float):
        super().__init__(daemon=True, name="lookahead_dist-elastic-heartbeat")
        self.store, self.key, self.interval = store, key, interval
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.store.add(self.key, 1)
            except Exception:  # the store is gone; the main thread reports it
                return
            self.stop_event.wait(self.interval)


@dataclass
class Timings:
    """Seconds spent in the last change of generation (monotonic clock of this worker)."""

    leave_s: float = 0.0
    agree_s: float = 0.0
    group_s: float = 0.0
    waited_for: list = field(default_factory=list)


class Membership:
    """This worker's side of the membership protocol (module docstring).

    Args:
        store: the job's store (a TCP store client, or its server in tests).
        member: this worker's id (its launch rank, 0 .. initial - 1).
        initial: the number of members of generation 0.
        incarnation: how often this member was restarted (> 0: it joins a running job).
        backend: the process-group backend.
        heartbeat: seconds between heartbeats in the store.
        dead_after: a member whose heartbeat has not moved for this long is dead.
        timeout: seconds to wait for an agreement or for a new group to form.
        op_timeout: the process group's timeout for one collective.
    """

    def __init__(
        self,
        store,
        member: int,
        initial: int,
        *,
        incarnation: int = 0,
        backend: str = "gloo",
        heartbeat: float = 0.5,
        dead_after: float = 10.0,
        timeout: float = 60.0,
        op_timeout: float = 300.0,
    ):
        for name, v in (("heartbeat", heartbeat), ("dead_after", dead_after), ("timeout", timeout)):
            if not (isinstance(v, (int, float)) and v > 0):
                raise ConfigError(f"Membership: {name} must be a positive number of seconds, got {v!r}")
        if dead_after < 2 * heartbeat:
            raise ConfigError(
                f"Membership: dead_after={dead_after} must be at least twice heartbeat={heartbeat}, or live "
                "members are declared dead"
            )
        if not (0 <= member < initial) or incarnation < 0:
            raise ConfigError(f"Membership: member must be in 0 .. {initial - 1} (got {member}), incarnation >= 0")
        self.store = comm.prefix_store(ROOT, store)
        self.member, self.initial, self.incarnation = int(member), int(initial), int(incarnation)
        self.backend, self.heartbeat, self.dead_after = backend, float(heartbeat), float(dead_after)
        self.timeout, self.op_timeout = float(timeout), float(op_timeout)
        self.view: View | None = None
        self.timings = Timings()
        beat_store = comm.prefix_store(ROOT, store, own_connection=True)
        self._beat = _Beat(beat_store, self._alive_key(member, incarnation), heartbeat)
        self._beat.start()

    @classmethod
    def from_env(cls, **kw) -> Membership:
        """From the launcher's environment: MASTER_ADDR/PORT (the store), RANK, WORLD_SIZE and
        LOOKAHEAD_ELASTIC_RESTART (the incarnation)."""
        env = os.environ
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE") if k not in env]
        if missing:
            raise ConfigError(f"Membership.from_env: {missing} not set; launch with `python -m lookahead_dist.elastic`")
        timeout = kw.get("timeout", 60.0)
        store = connect_store(env["MASTER_ADDR"], int(env["MASTER_PORT"]), timeout)
        return cls(
            store,
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            incarnation=int(env.get("LOOKAHEAD_ELASTIC_RESTART", "0")),
            **kw,
        )

    # -- keys -------------------------------------------------------------------------
    @staticmethod
    def _alive_key(member: int, incarnation: int) -> str:
        return f"alive/{member}.{incarnation}"

    def _get(self, key: str):
        try:
            return self.store.get(key) if self.store.check([key]) else None
        except Exception as exc:
            raise self._store_lost(exc) from exc

    def _store_lost(self, exc) -> MembershipError:
        return MembershipError(
            f"member {self.member}: the elastic store is unreachable ({type(exc).__name__}: {exc}); its host (the "
            "supervisor of node 0) is gone, so no new membership can be agreed; stopping (resume from the last "
            "checkpoint)"
        )

    # -- the protocol -----------------------------------------------------------------
    def start(self) -> View:
        """Form generation 0 (all ``initial`` members), or join the running job if this is a restarted member."""
        if self.incarnation > 0:
            return self.join()
        first = View(0, tuple(range(self.initial)), (0,) * self.initial)
        try:
            won = self.store.compare_set("gen/0/members", "", first.to_json())
        except Exception as exc:
            raise self._store_lost(exc) from exc
        view = View.from_json(won)
        if self.member not in view.members:
            return self.join()
        return self._form(view)

    def failed(self) -> bool:
        """True when a member of the current generation reported a failure."""
        try:
            return self.store.check([f"gen/{self.view.generation}/failed"])
        except Exception as exc:
            raise self._store_lost(exc) from exc

    def report_failure(self) -> None:
        try:
            self.store.set(f"gen/{self.view.generation}/failed", str(self.member))
        except Exception as exc:
            raise self._store_lost(exc) from exc

    def pending_joins(self) -> bool:
        """True when a restarted member asked to join and no generation has taken it yet."""
        return len(self._joins()) > self.view.joins_seen

    def _joins(self) -> list[tuple[int, int]]:
        text = self._get("joins")
        if not text:
            return []
        return [tuple(int(x) for x in e.split(".")) for e in text.decode().split(",") if e]

    def regroup(self, step: int, oldest: int, reason: str = "failure") -> View:
        """Leave the current generation and form the next one; returns it (its ``step`` is where to restart).

        ``step``: the steps this worker has completed; ``oldest``: the oldest step whose state it still holds.
        """
        t0 = time.monotonic()
        _leave_group()
        leave_s = time.monotonic() - t0
        while True:
            view = self.view
            t0 = time.monotonic()
            nxt = self._agree(view, step, oldest, reason)
            self.timings = Timings(leave_s=leave_s, agree_s=time.monotonic() - t0)
            if self.member not in nxt.members:
                raise MembershipError(
                    f"member {self.member}: left out of generation {nxt.generation} (members {list(nxt.members)}): "
                    f"the others found it dead; restart it to rejoin"
                )
            try:
                return self._form(nxt)
            except MembershipError:
                raise
            except Exception:  # a member of nxt died before its group formed: go on to the next generation
                _leave_group()
                self.view = nxt
                self.report_failure()
                reason = "failure"

    def _agree(self, view: View, step: int, oldest: int, reason: str) -> View:
        g = view.generation
        key = f"gen/{g + 1}/members"
        me = json.dumps({"step": step, "oldest": oldest, "reason": reason})
        try:
            self.store.set(f"gen/{g}/arrived/{self.member}", me)
        except Exception as exc:
            raise self._store_lost(exc) from exc
        seen: dict[int, tuple[int, float]] = {}
        deadline = time.monotonic() + self.timeout + self.dead_after
        while True:
            text = self._get(key)
            if text is not None:
                return View.from_json(text)
            arrived, dead = {}, []
            for m, inc in zip(view.members, view.incarnations):
                rec = self._get(f"gen/{g}/arrived/{m}")
                if rec is not None:
                    arrived[m] = json.loads(rec)
                    continue
                if self._get(dead_key(m, inc)) is not None:
                    dead.append(m)
                    continue
                beat = int(self.store.add(self._alive_key(m, inc), 0))
                now = time.monotonic()
                if m not in seen or seen[m][0] != beat:
                    seen[m] = (beat, now)
                elif now - seen[m][1] > self.dead_after:
                    dead.append(m)
            if len(arrived) + len(dead) == len(view.members):
                return self._propose(view, arrived, dead, key)
            if time.monotonic() > deadline:
                waiting = sorted(set(view.members) - set(arrived) - set(dead))
                raise MembershipError(
                    f"member {self.member}: no agreement on generation {g + 1} within "
                    f"{self.timeout + self.dead_after:g} s: members {waiting} are alive (heartbeat moving) but never "
                    "arrived"
                )
            time.sleep(min(0.02, self.heartbeat / 2))

    def _propose(self, view: View, arrived: dict, dead: list, key: str) -> View:
        joins = self._joins()
        new = [(m, inc) for m, inc in joins[view.joins_seen :] if m not in arrived or inc > self._inc(view, m)]
        members = {m: self._inc(view, m) for m in arrived}
        for m, inc in new:
            members[m] = max(inc, members.get(m, -1))
        ids = tuple(sorted(members))
        step = min(int(a["step"]) for a in arrived.values())
        reason = "join" if all(a["reason"] == "join" for a in arrived.values()) else "failure"
        proposal = View(
            view.generation + 1,
            ids,
            tuple(members[m] for m in ids),
            step,
            tuple(sorted(m for m, _ in new)),
            tuple(sorted(dead)),
            reason,
            len(joins),
        )
        try:
            return View.from_json(self.store.compare_set(key, "", proposal.to_json()))
        except Exception as exc:
            raise self._store_lost(exc) from exc

    @staticmethod
    def _inc(view: View, m: int) -> int:
        return view.incarnations[view.members.index(m)] if m in view.members else -1

    def _form(self, view: View) -> View:
        """Form ``view``'s process group on its own store prefix."""
        t0 = time.monotonic()
        pg_store = comm.prefix_store(f"gen/{view.generation}/pg", self.store)
        comm.init_process_group(
            self.backend,
            timeout_s=self.op_timeout,
            store=pg_store,
            rank=view.rank_of(self.member),
            world_size=view.world_size,
        )
        self.view = view
        self.timings.group_s = time.monotonic() - t0
        return view

    def join(self) -> View:
        """Ask to join the running job and wait until a generation takes this member (or the job ends)."""
        try:
            self.store.append("joins", f"{self.member}.{self.incarnation},")
            g = 0
            while True:
                if self.store.check(["finished"]):
                    raise MembershipError(f"member {self.member}: the job finished before this member could rejoin")
                text = self._get(f"gen/{g + 1}/members")
                if text is None:
                    time.sleep(0.05)
                    continue
                view = View.from_json(text)
                g += 1
                if self.member in view.members and self.incarnation == self._inc(view, self.member):
                    return self._form(view)
        except MembershipError:
            raise
        except Exception as exc:
            raise self._store_lost(exc) from exc

    def finish(self) -> bool:
        """Wait until every member of the current generation is done (or dead); False if a failure is reported first.

        After True the job is over: a member still waiting to rejoin is told so.
        """
        g = self.view.generation
        try:
            self.store.set(f"gen/{g}/done/{self.member}", "1")
            seen: dict[int, tuple[int, float]] = {}
            deadline = time.monotonic() + self.timeout + self.dead_after
            while time.monotonic() < deadline:
                if self.failed():
                    return False
                waiting = []
                for m, inc in zip(self.view.members, self.view.incarnations):
                    if self._get(f"gen/{g}/done/{m}") is not None or self._get(dead_key(m, inc)) is not None:
                        continue
                    beat = int(self.store.add(self._alive_key(m, inc), 0))
                    now = time.monotonic()
                    if m not in seen or seen[m][0] != beat:
                        seen[m] = (beat, now)
                    if now - seen[m][1] <= self.dead_after:
                        waiting.append(m)
                if not waiting:
                    break
                time.sleep(0.02)
            self.store.set("finished", "1")
        except MembershipError:
            raise
        except Exception as exc:
            raise self._store_lost(exc) from exc
        return True

    def close(self) -> None:
        """Stop the heartbeat and leave the process group (after :meth:`finish`, or on an error)."""
        self._beat.stop_event.set()
        comm.destroy_process_group()

    def __repr__(self) -> str:
        v = self.view
        return f"Membership(member={self.member}, incarnation={self.incarnation}, generation={v and v.generation})"
