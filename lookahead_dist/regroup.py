"""Training that goes on when a worker dies: :class:`Elastic` rebuilds the optimizer wrapper for each generation.

:class:`Elastic` drives a :class:`~lookahead_dist.decentralized.Decentralized` or
:class:`~lookahead_dist.slowmo.SlowMo` built by the user's factory
``make_opt(comm, topology)`` over the user's model. At every step it keeps a copy
of the wrapper's state (model, push-sum weight, base-optimizer state, slow copy,
slow momentum, step) taken *before* the step's base update and mix. When a member
is lost (a :class:`~lookahead_dist.errors.CommError`, or the failure flag of
:mod:`lookahead_dist.membership`), the survivors:

1. agree on the next generation and its restart step s, the smallest step any
   survivor has completed (:meth:`Membership.regroup`), in one new process group;
2. re-plan the topology for the new size (:func:`replan`: a built-in generator is
   generated again for n - k; a file whose matrices fix the size cannot be and ends
   the job with a :class:`~lookahead_dist.errors.TopologyError` naming it);
3. build a new wrapper with ``make_opt`` and load into it their own copy from the
   start of step s: every survivor restarts from its state before step s's mix, so
   mass that was in flight at the failure (push-sum) is neither lost twice nor
   counted twice, and the dead members' states drop out. The run from there is the
   reference engine started on the survivors' states with the new schedule, and
   ``finalize()`` gives the exact average of the survivors.

A restarted worker joins at the next sync point (every ``sync_every`` steps, by
default SlowMo's tau): the members see its request, move to a generation that
includes it, and a neighbour (the member before it in rank order) hands it its
state, so it continues with the current model, slow state and step.

The copy of the state costs one copy of the model and optimizer state per step
(``history`` copies are kept: survivors can be up to the schedule's propagation
depth apart, see :func:`max_lead`). Schedules use the global step: step k mixes
with P_{k mod period} of the generation's schedule.

Not supported with elastic membership: ``overlap``, ``overlap_slow`` and ``shard``
(their state depends on in-flight communication or on the world size), several
agents on one rank and slow agents on ranks of their own; ``elastic=True`` on the
wrappers refuses them at construction. SlowMo's ``outer`` optimizer and
``fragments`` are supported: their state (outer momentum, each fragment's gamma)
does not depend on the world size and is restored with the rest. So is a
compressed ``sync_dtype``: each member keeps the error feedback of what it sent
(a residual of its own numerators); the residual of the chunk of the average a
rank owned is cut by the old world size and ranks and restarts at zero, and a
joiner starts with no residual at all (its donor's is the donor's own error).
"""

from __future__ import annotations

import io
import os
import time
import warnings
from typing import Callable

import numpy as np
import torch
import yaml

from lookahead_dist.comm import Comm
from lookahead_dist.decentralized import Decentralized, check_elastic
from lookahead_dist.errors import CommError, ConfigError, MembershipError, TopologyError
from lookahead_dist.generators import GENERATORS
from lookahead_dist.membership import Membership, View
from lookahead_dist.slowmo import SlowMo
from lookahead_dist.topology import Topology, builtin, from_mapping, load

__all__ = ["Elastic", "replan", "max_lead"]

_SIZE_PARAMS = {"n", "rows", "cols", "nodes"}
_FIXED_SIZE = {"two_agent": "Lookahead's two agents"}


def _why_fixed(mapping: dict) -> str:
    """Why ``mapping`` cannot be generated again for another number of agents ("" if it can)."""
    for key in ("matrix", "edges", "nodes", "undirected"):
        if key in mapping:
            return f"it gives '{key}', whose matrices fix the number of agents"
    roles = mapping.get("roles")
    if roles is not None and not (isinstance(roles, list) and all(r == "fast" for r in roles)):
        return "it has slow agents ('roles'), whose ranks cannot be re-placed"
    place = mapping.get("placement")
    if place is not None and list(place) != list(range(len(place))):
        return "its 'placement' puts agents on chosen ranks"
    specs = [mapping.get("generator")] if "generator" in mapping else []
    for i, phase in enumerate(mapping.get("schedule") or []):
        if not isinstance(phase, dict) or "generator" not in phase:
            return f"schedule[{i}] is not a generator"
        specs.append(phase["generator"])
    for spec in specs:
        name = spec if isinstance(spec, str) else spec.get("type") if isinstance(spec, dict) else None
        if name in _FIXED_SIZE:
            return f"generator {name} has a fixed size ({_FIXED_SIZE[name]})"
        if name == "hierarchical" and not (isinstance(spec, dict) and "per_node" in spec):
            return "hierarchical needs per_node to drop whole nodes"
    return ""


def _resized(spec):
    if isinstance(spec, dict):
        return {k: v for k, v in spec.items() if k not in _SIZE_PARAMS}
    return spec


def _mapping(spec) -> tuple[dict, str]:
    if isinstance(spec, Topology):
        raise TopologyError(
            f"{spec.source}: a built Topology cannot be re-planned; give Elastic its YAML path, mapping or "
            "generator name"
        )
    if isinstance(spec, str) and spec in GENERATORS:
        return {"generator": spec}, f"<builtin {spec}>"
    if isinstance(spec, dict):
        return dict(spec), "<mapping>"
    if isinstance(spec, (str, os.PathLike)):
        path = os.fspath(spec)
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as exc:
            raise TopologyError(f"{path}: cannot read the topology file ({exc})") from None
        if not isinstance(data, dict):
            raise TopologyError(f"{path}: a topology must be a mapping of keys, got {type(data).__name__}")
        data.setdefault("name", os.path.splitext(os.path.basename(path))[0])
        return data, path
    raise ConfigError(f"topology: expected a generator name, a YAML path or a mapping, got {type(spec).__name__}")


def replan(spec, n: int) -> Topology | None:
    """The topology ``spec`` (generator name, YAML path or mapping; None: none) generated again for ``n`` ranks.

    Sizes (n, rows, cols, nodes) are dropped and filled from ``n``; hierarchical keeps
    per_node (so n must be a multiple of it: a whole node was lost). A topology
    whose matrices, edges, roles or placement fix its size raises
    :class:`TopologyError` naming it.
    """
    if spec is None:
        return None
    mapping, source = _mapping(spec)
    why = _why_fixed(mapping)
    if why:
        raise TopologyError(
            f"{source}: cannot be re-planned for {n} ranks after a membership change: {why}. The job stops here; "
            "resume it from its last checkpoint with a topology for the new size, or use a built-in generator"
        )
    for key in ("agents", "placement", "roles"):
        mapping.pop(key, None)
    if "generator" in mapping:
        mapping["generator"] = _resized(mapping["generator"])
    if "schedule" in mapping:
        mapping["schedule"] = [dict(p, generator=_resized(p["generator"])) for p in mapping["schedule"]]
    if not mapping.get("name"):
        g = mapping.get("generator")
        mapping["name"] = g if isinstance(g, str) else g.get("type", "custom") if isinstance(g, dict) else "custom"
    return from_mapping(mapping, source=f"{source} (re-planned for {n} ranks)", world_size=n)


def max_lead(topology: Topology | None, tau: int | None = None, limit: int = 1024) -> int:
    """How many steps one survivor can be ahead of another when a rank dies (a bound).

    A rank whose in-neighbour of step k is dead (or waiting) cannot finish step k, so
    the death spreads one hop of the schedule's graph per step; a survivor can be
    ahead by at most the steps it takes to reach every rank, maximised over the dead
    rank and the phase. A slow step (every ``tau`` steps) waits for everyone.
    Above ``limit`` agents this returns ``limit``.
    """
    if topology is None:
        return 1
    sched, n = topology.schedule, topology.n
    if n > limit:
        return min(limit, tau or limit)
    adj = []
    for k in range(sched.period):
        rows, cols, _ = sched.phases[sched.phase_index(k)].entries()
        a = np.zeros((n, n), dtype=bool)
        a[rows, cols] = True
        adj.append(a)
    worst = 0
    for start in range(sched.period):
        reach, t = np.eye(n, dtype=bool), 0
        while not reach.all() and t < n * sched.period:
            reach = reach | ((reach.astype(np.int64) @ adj[(start + t) % sched.period].astype(np.int64)) > 0)
            t += 1
        worst = max(worst, t)
    return min(worst, tau) if tau else worst


def _clone(obj):
    """A deep copy of the tensors of a state dict (nested dicts, lists, tuples); other values are shared."""
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return type(obj)((k, _clone(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def _gossip(opt) -> Decentralized | None:
    return opt if isinstance(opt, Decentralized) else opt.base if isinstance(opt, SlowMo) else None


def _check_wrapper(opt, world_size: int) -> None:
    """The checks of ``elastic=True`` (:func:`~lookahead_dist.decentralized.check_elastic`), for a wrapper built
    without it too."""
    if not isinstance(opt, (Decentralized, SlowMo)):
        raise ConfigError(f"Elastic: make_opt must return a Decentralized or SlowMo, got {type(opt).__name__}")
    options = {k: getattr(opt, k, False) for k in ("overlap", "overlap_slow", "shard")}
    base = _gossip(opt)
    check_elastic(f"Elastic: {type(opt).__name__}", base and base.topology, world_size, **options)


def _load(opt, state: dict, *, joiner: bool = False, same_ranks: bool = False) -> None:
    """Load a state captured from another generation's wrapper into ``opt`` (same model, other topology).

    A compressed slow sync's error feedback: the residual of the chunk of the average this rank owned goes
    (unless ``same_ranks``: the same world, rank for rank), and a ``joiner``'s goes whole (its donor's)."""
    sd = _clone(state)
    own = sd.get("decentralized", sd.get("base"))
    base = _gossip(opt)
    if own is not None:
        (bufs,) = own["agents"].values()
        own["agents"] = {base.fast_agent: bufs}
        own["fingerprint"] = base.topology.fingerprint()
    if "slowmo" in sd:
        sd["slowmo"]["world_size"] = opt.comm.world_size
        for sync in sd["slowmo"].get("compress", {}).get("syncs", []):
            kept = sync.get("residual")
            if kept is not None and not same_ranks:
                kept["owned"] = {}  # zeros again on first use, in this world's chunks
                if joiner:
                    kept["sent"] = {}
    opt.load_state_dict(sd)


class _Failure(Exception):
    """A member reported a failure through the store."""


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class Elastic:
    """Train with ``make_opt(comm, topology)``'s wrapper; go on among the survivors when members die.

    Args:
        make_opt: builds the wrapper for one generation over the user's model, e.g.
            ``lambda comm, topo: Decentralized(torch.optim.SGD(model.parameters(), lr=0.1), model, topo, comm=comm)``.
            It is called again after every membership change (the model keeps its Parameter objects).
        topology: the gossip topology to re-plan at each change: a built-in generator name, a YAML path or a
            mapping (None: SlowMo over local SGD).
        membership: this worker's :class:`~lookahead_dist.membership.Membership` (default: from the
            environment that ``python -m lookahead_dist.elastic`` sets).
        history: how many per-step copies of the state to keep (default: :func:`max_lead` + 2).
        sync_every: steps between the checks for members asking to (re)join (default: SlowMo's tau, else 10).

    Loop::

        el = Elastic(make_opt, "ring")
        while True:
            while el.step_count < steps:
                el.opt.zero_grad(); loss_at(el.step_count).backward(); el.step()
            if el.finalize():   # False: a member was lost at the end; the loop goes on from el.step_count
                break
        el.close()

    or ``el.run(steps, compute)`` with ``compute(k)`` doing the forward and backward of step k.
    Data of step k must be a function of (k, the member id or rank): after a change the
    survivors repeat the steps since the restart step. ``events`` lists every change.
    """

    def __init__(
        self,
        make_opt: Callable,
        topology=None,
        *,
        membership: Membership | None = None,
        history: int | None = None,
        sync_every: int | None = None,
    ):
        if not callable(make_opt):
            raise ConfigError(f"Elastic: make_opt must be callable, got {type(make_opt).__name__}")
        for name, v in (("history", history), ("sync_every", sync_every)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"Elastic: {name} must be an integer >= 1 or None, got {v!r}")
        self.make_opt, self.spec = make_opt, topology
        if isinstance(topology, Topology):
            warnings.warn(
                f"{topology.source}: losing a member will end the job: a built Topology cannot be re-planned "
                "(give its YAML path, mapping or generator name)",
                stacklevel=2,
            )
        elif topology is not None:
            mapping, source = _mapping(topology)
            why = _why_fixed(mapping)
            if why:
                warnings.warn(
                    f"{source}: losing a member will end the job: it cannot be re-planned ({why})", stacklevel=2
                )
        self._history_arg, self._sync_arg = history, sync_every
        self.membership = membership or Membership.from_env()
        self.events: list[dict] = []
        self._history: dict[int, dict] = {}
        self.opt = None
        view = self.membership.start()
        self._build(view, None)

    # -- views -----------------------------------------------------------------------------
    @property
    def view(self) -> View:
        return self.membership.view

    @property
    def member(self) -> int:
        return self.membership.member

    @property
    def rank(self) -> int:
        return self.view.rank_of(self.member)

    @property
    def world_size(self) -> int:
        return self.view.world_size

    @property
    def step_count(self) -> int:
        return self.opt.step_count

    # -- building a generation --------------------------------------------------------------
    def _build(self, view: View, state: dict | None) -> float:
        """Re-plan, build the wrapper, hand states to joiners and load ``state``; returns the seconds it took."""
        t0 = time.monotonic()
        topo = self._plan(view.world_size)
        self.topology = topo
        self.opt = None
        opt = self.make_opt(Comm(heartbeat=0), topo)
        _check_wrapper(opt, view.world_size)
        if view.joined:
            state = self._hand_over(view, opt.comm, state)
        if state is not None:
            _load(opt, state, joiner=self.member in view.joined)
        self.opt = opt
        tau = getattr(opt, "tau", None)
        self.depth = self._history_arg or max_lead(topo, tau) + 2
        self.sync_every = self._sync_arg or tau or 10
        return time.monotonic() - t0

    def _plan(self, n: int) -> Topology | None:
        """The topology for ``n`` ranks: as given at the job's own size (a custom file too), else re-planned."""
        if n == self.membership.initial and self.spec is not None:
            if isinstance(self.spec, Topology):
                return self.spec
            if isinstance(self.spec, str) and self.spec in GENERATORS:
                return builtin(self.spec, world_size=n)
            return load(self.spec, world_size=n)
        return replan(self.spec, n)

    def _hand_over(self, view: View, comm: Comm, state: dict | None) -> dict | None:
        """Every joiner takes the state of the member before it in rank order (not itself a joiner)."""
        ranks = {m: view.rank_of(m) for m in view.members}
        for j in view.joined:
            r = ranks[j]
            donor = next(
                view.members[(r - i) % view.world_size]
                for i in range(1, view.world_size + 1)
                if view.members[(r - i) % view.world_size] not in view.joined
            )
            if self.member == donor:
                buf = io.BytesIO()
                torch.save(state, buf)
                data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
                comm.exchange([(r, torch.tensor([data.numel()], dtype=torch.int64))], [])
                comm.exchange([(r, data)], [])
            elif self.member == j:
                size = torch.zeros(1, dtype=torch.int64)
                comm.exchange([], [(ranks[donor], size)])
                data = torch.empty(int(size), dtype=torch.uint8)
                comm.exchange([], [(ranks[donor], data)])
                state = torch.load(io.BytesIO(data.numpy().tobytes()), weights_only=False)
        return state

    def _remember(self, k: int) -> None:
        if k not in self._history:
            self._history[k] = _clone(self.opt.state_dict())
            for old in sorted(self._history)[: -self.depth]:
                del self._history[old]

    # -- a change of generation -------------------------------------------------------------------
    def _change(self, reason: str, why: str = "") -> None:
        detected, t0 = time.time(), time.monotonic()
        # the newest copy is the last consistent state: a step that failed may have changed the model already
        step, oldest = max(self._history), min(self._history)
        self.opt = None  # the old wrapper holds the old group; it must go before the group is destroyed
        if reason == "failure":
            self.membership.report_failure()
        while True:
            view = self.membership.regroup(step, oldest, reason)
            timings = self.membership.timings
            state = self._history.get(view.step)
            if state is None:
                raise MembershipError(
                    f"member {self.member}: generation {view.generation} restarts at step {view.step}, but this "
                    f"member holds copies of steps {sorted(self._history)} only; raise Elastic(history=...)"
                )
            try:
                replan_s = self._build(view, state)
                break
            except MembershipError:
                raise
            except CommError:  # one more member died while the generation was being built
                pass
            self.opt = None
            self.membership.report_failure()
            step, oldest, reason = view.step, view.step, "failure"
            self._history = {view.step: state}
        self._history = {view.step: state}
        self.events.append(
            {
                "generation": view.generation,
                "reason": view.reason,
                "why": why,
                "lost": list(view.lost),
                "joined": list(view.joined),
                "world_size": view.world_size,
                "topology": None if self.topology is None else f"{self.topology.name} on {self.topology.n}",
                "from_step": step,
                "to_step": view.step,
                "detected_at": detected,
                "leave_s": timings.leave_s,
                "agree_s": timings.agree_s,
                "group_s": timings.group_s,
                "replan_s": replan_s,
                "stall_s": time.monotonic() - t0,
            }
        )

    def load_state_dict(self, state: dict) -> None:
        """Load a state of ``el.opt.state_dict()`` saved at this rank of a world of this size (a resumed run;
        the member ids may differ), error feedback included; the copies kept for a rollback start again from it."""
        _load(self.opt, state, same_ranks=True)
        self._history.clear()

    # -- the loop -----------------------------------------------------------------------------
    def step(self, closure=None):
        """One step of the wrapper; after a membership change it returns with ``step_count`` at the restart step."""
        loss, why = None, None
        self._remember(self.opt.step_count)
        try:
            if self.membership.failed():
                raise _Failure("a member reported a failure")
            loss = self.opt.step(closure)
            if self.opt.step_count % self.sync_every == 0:
                self._remember(self.opt.step_count)
                if self.opt.comm.all_reduce_flag(self.membership.pending_joins()):
                    why = ""
        except MembershipError:
            raise
        except (CommError, _Failure) as exc:
            why = _first_line(exc)
        # outside the except clause: the traceback's frames hold the failed process group, whose sockets
        # must close when it is destroyed so that the neighbours' communication fails too
        if why is not None:
            self._change("failure" if why else "join", why)
        return loss

    def finalize(self) -> bool:
        """Every survivor's model <- their exact average, once every member is done; False after a change."""
        self._remember(self.opt.step_count)
        why = None
        try:
            if self.membership.failed():
                raise _Failure("a member reported a failure")
            self.opt.finalize()
        except MembershipError:
            raise
        except (CommError, _Failure) as exc:
            why = _first_line(exc)
        if why is None and not self.membership.finish():
            why = "a member reported a failure while the others finished"
        if why is not None:
            self._change("failure", why)
            return False
        return True

    def run(self, steps: int, compute: Callable[[int], None]) -> None:
        """Train to ``steps`` steps with ``compute(k)`` (forward and backward of step k), then finalize."""
        while True:
            while self.step_count < steps:
                self.opt.zero_grad()
                compute(self.step_count)
                self.step()
            if self.finalize():
                return

    def close(self) -> None:
        self.membership.close()

    def __repr__(self) -> str:
        return f"Elastic({self.opt!r}, {self.membership!r})"
