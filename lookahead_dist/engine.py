"""The distributed mixing engine: applies X <- X P_k to agents that live on many processes.

Each rank registers the agents it hosts (``placement[i] == rank``) as lists of
flat buffers (one per dtype/device group, see :mod:`lookahead_dist.flat`).
:meth:`MixingEngine.mix` looks up the plan of P_k's phase (compiled once per
distinct phase by :func:`lookahead_dist.plan.compile_plan`) and runs it:

* identity: nothing;
* agents on this rank only: local weighted sums;
* a block of equal receiving columns c 1^T: one all-reduce SUM of sum_i c_i x_i;
* any other pattern: one batched exchange of flat buffers with the peers, then
  x_j <- w_jj x_j + sum_i w_ij recv_i, one pass per received buffer.

Overlapped mixing splits :meth:`MixingEngine.mix` in two: :meth:`MixingEngine.start`
posts the step's all-reduces and exchange without waiting, reading every agent
from a caller's snapshot (buffers nothing else writes while they are in
flight), and :meth:`MixingEngine.finish` waits and writes x_j <- sum_i w_ij
snapshot_i into the agents, with the same arithmetic in the same order as
:meth:`MixingEngine.mix`, so an overlapped mix of the same values is bitwise the
blocking one.

Push-sum schedules need no special path: the push-sum weight is carried as one
trailing element of an agent's first buffer, so it is mixed by the same
arithmetic and travels in the same message.

:func:`exact_average_` is the one exact average of the workers,
sum_r w_r x_r / sum_r w_r, that finalising a run, SlowMo's slow step and an
evaluation model all use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lookahead_dist.comm import Comm, Pending
from lookahead_dist.errors import ConfigError
from lookahead_dist.flat import without_weight
from lookahead_dist.mixing import Schedule
from lookahead_dist.plan import Plan, compile_plan, group_rank_sets

__all__ = ["MixingEngine", "MixInFlight", "exact_average_", "start_exact_average", "AverageInFlight"]


@torch.no_grad()
def exact_average_(
    buffers: list[torch.Tensor],
    weight: float,
    comm: Comm,
    ranks=None,
    *,
    weight_slot: bool = False,
    weight_sum: float | None = None,
    shard_out: torch.Tensor | None = None,
) -> float:
    """In place: ``buffers`` <- the exact average of the workers, x_bar = sum_r w_r x_r / sum_r w_r.

    Every rank of ``ranks`` (default: all) calls it with its own ``buffers``
    (its values x_r: the model, for push-sum the de-biased z = x / w) and its
    ``weight`` w_r: the push-sum weight, 1 for a plain worker, 0 for a rank
    without a worker (a passive slow rank: it adds nothing and receives the
    average). The buffers become the numerators w_r x_r (no pass when
    w_r = 1), each is summed over the ranks by one all-reduce, and divided by
    the sum of the weights, which travels

    * with ``weight_slot``: in the trailing element of ``buffers[0]`` (the
      flat layout's push-sum slot, :func:`lookahead_dist.flat.without_weight`),
      set to w_r here, summed by the same all-reduce, and 1 afterwards;
    * with ``weight_sum`` given: nowhere (the caller knows it, e.g. the world size);
    * otherwise: in one more all-reduce, of a float64 scalar, before the buffers'.

    ``shard_out``: ``buffers[0]`` (padded to a multiple of the world size) is
    reduce-scattered instead, and ``shard_out`` receives this rank's chunk of
    its average; ``buffers[0]`` is then scratch.

    Returns the sum of the weights. The arithmetic is the same whatever the
    caller: the product and the quotient in each buffer's own dtype, the
    quotient by a tensor holding the summed slot (``weight_slot``) or by the
    Python float sum. :func:`start_exact_average` is the same average, started
    without waiting.
    """
    assert not (weight_slot and shard_out is not None), "the weight slot is not sharded"
    ranks = list(range(comm.world_size)) if ranks is None else list(ranks)
    weight = float(weight)
    _to_numerators(buffers, weight, weight_slot)
    if not weight_slot and weight_sum is None:
        total = torch.tensor([weight], dtype=torch.float64, device=comm.device_for_collectives())
        comm.all_reduce_sum(total, ranks)
        weight_sum = float(total)
    sums = list(buffers)
    for i, b in enumerate(buffers):
        if i == 0 and shard_out is not None:
            comm.reduce_scatter_sum(shard_out, b)
            sums[0] = shard_out
        else:
            comm.all_reduce_sum(b, ranks)
    return _divide(sums, buffers, weight_slot, weight_sum)


def _to_numerators(buffers: list[torch.Tensor], weight: float, weight_slot: bool) -> None:
    if weight != 1.0:
        for v in without_weight(buffers, weight_slot):
            v.mul_(weight)
    if weight_slot:
        buffers[0][-1] = weight


def _divide(sums: list[torch.Tensor], buffers: list[torch.Tensor], weight_slot: bool, weight_sum) -> float:
    if weight_slot:
        denom = buffers[0][-1].clone()  # a 0-dim tensor: each buffer divides in its own dtype
        weight_sum = float(denom)
    else:
        denom = float(weight_sum)
    for b in sums:
        b.div_(denom)
    return float(weight_sum)


@dataclass
class AverageInFlight:
    """An exact average started by :func:`start_exact_average`; :meth:`finish` waits and divides."""

    buffers: list[torch.Tensor]
    pending: Pending | None  # None: nothing in flight
    weight_slot: bool
    weight_sum: float | None
    total: torch.Tensor | None

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.wait()

    @torch.no_grad()
    def finish(self) -> float:
        """Wait, then ``buffers`` <- their exact average; returns the sum of the weights."""
        self.wait()
        weight_sum = float(self.total) if self.total is not None else self.weight_sum
        return _divide(self.buffers, self.buffers, self.weight_slot, weight_sum)


@torch.no_grad()
def start_exact_average(
    buffers: list[torch.Tensor],
    weight: float,
    comm: Comm,
    ranks=None,
    *,
    weight_slot: bool = False,
    weight_sum: float | None = None,
    channel: str = "",
) -> AverageInFlight:
    """:func:`exact_average_` without waiting: the all-reduces run on ``channel`` (see
    :meth:`lookahead_dist.comm.Comm.group`) while the caller computes; ``finish()`` on the
    result waits and divides. ``buffers`` must not be touched until then."""
    ranks = list(range(comm.world_size)) if ranks is None else list(ranks)
    weight = float(weight)
    _to_numerators(buffers, weight, weight_slot)
    total, parts = None, []
    if not weight_slot and weight_sum is None:
        total = torch.tensor([weight], dtype=torch.float64, device=comm.device_for_collectives())
        parts.append(comm.start_all_reduce_sum(total, ranks, channel))
    parts += [comm.start_all_reduce_sum(b, ranks, channel) for b in buffers]
    pending = Pending.merge(comm, f"exact average over ranks {ranks}", ranks, parts)
    return AverageInFlight(list(buffers), pending, weight_slot, weight_sum, total)


class _Peers:
    """The peers of a step's operations, united only when an error report reads them (O(1) per step)."""

    def __init__(self, groups):
        self.groups = groups

    def __iter__(self):
        return iter(sorted({p for g in self.groups for p in (g or ())}))


class _StepText:
    def __init__(self, k: int, peers: _Peers):
        self.k, self.peers = k, peers

    def __str__(self) -> str:
        peers = list(self.peers)
        shown = peers if len(peers) <= 16 else f"[{peers[0]}, ..., {peers[-1]}] ({len(peers)} ranks)"
        return f"mixing step {self.k} (peers {shown})"


@dataclass
class MixInFlight:
    """A mixing step started by :meth:`MixingEngine.start`, to be ended by :meth:`MixingEngine.finish`."""

    k: int
    plan: Plan
    sources: dict[int, list[torch.Tensor]]
    pending: Pending | None  # None: P_k is the identity, nothing was started
    reduced: list = field(default_factory=list)  # (receivers, group index, all-reduce buffer)
    received: dict = field(default_factory=dict)  # (remote agent, group index) -> receive buffer

    def wait(self) -> None:
        """Wait for the communication only (the agents are written by ``finish``)."""
        self.pending.wait()


class MixingEngine:
    """Mix the agents of one rank according to a schedule and a placement.

    Args:
        schedule: the mixing schedule (column-stochastic, or push-sum).
        placement: agent -> rank, one entry per agent.
        comm: the :class:`~lookahead_dist.comm.Comm` of this process.
        source: where the schedule came from, for error messages.
        check: compare the schedule's hash and the world size across ranks at start.

    Every rank must build its engine (it creates the process groups that the
    schedule's all-reduces need, in the same order on every rank).
    """

    def __init__(self, schedule: Schedule, placement, comm: Comm, *, source: str = "<schedule>", check: bool = True):
        self.schedule = schedule
        self.placement = tuple(int(r) for r in placement)
        self.comm = comm
        self.rank = comm.rank
        if len(self.placement) != schedule.n:
            raise ConfigError(
                f"{source}: placement has {len(self.placement)} entries but the schedule has {schedule.n} agents"
            )
        needed = max(self.placement) + 1
        comm.check_world_size(needed, source)
        if check:
            fp = schedule.fingerprint() + ":" + ",".join(map(str, self.placement))
            comm.check_same(fp, f"schedules ({source})")
        # Process groups first, on every rank, in one global order.
        for ph in schedule.phases:
            for ranks in group_rank_sets(ph, self.placement):
                comm.group(ranks)
        self.plans: list[Plan] = [compile_plan(ph, self.placement, self.rank) for ph in schedule.phases]
        self.local_agents = tuple(i for i, r in enumerate(self.placement) if r == self.rank)
        self.agents: dict[int, list[torch.Tensor]] = {}
        self._scratch_cache: dict[tuple, torch.Tensor] = {}
        self.bytes_sent = 0

    # -- agents -----------------------------------------------------------------
    def add_agent(self, agent: int, buffers: list[torch.Tensor]) -> None:
        """Register local ``agent``'s flat buffers (mixed in place)."""
        if agent not in self.local_agents:
            raise ConfigError(
                f"agent {agent} is placed on rank {self.placement[agent] if 0 <= agent < len(self.placement) else '?'}"
                f", not on this rank {self.rank}"
            )
        if self.agents:
            ref = next(iter(self.agents.values()))
            shapes = [(b.numel(), b.dtype, b.device) for b in buffers]
            if shapes != [(b.numel(), b.dtype, b.device) for b in ref]:
                raise ConfigError(f"agent {agent}: its buffers {shapes} differ from the other agents' on this rank")
        self.agents[agent] = list(buffers)

    def _check_agents(self) -> None:
        missing = [a for a in self.local_agents if a not in self.agents]
        if missing:
            raise ConfigError(f"rank {self.rank}: agents {missing} are placed here but were never added")

    def buffer_bytes(self) -> int:
        ref = next(iter(self.agents.values()))
        return sum(b.numel() * b.element_size() for b in ref)

    # -- mixing -----------------------------------------------------------------
    def plan(self, k: int) -> Plan:
        return self.plans[self.schedule.phase_index(k)]

    def mix(self, k: int) -> None:
        """Apply P_k to every agent (all ranks call this for the same k)."""
        plan = self.plan(k)
        if plan.is_noop:
            return
        self._check_agents()
        ngroups = len(next(iter(self.agents.values())))
        for ar in plan.allreduces:
            self._allreduce(ar, ngroups)
        if plan.exchange is not None:
            self._exchange(plan, ngroups)
        if plan.local is not None:
            self._combine(plan.local.combine, {}, ngroups)
        self.bytes_sent += plan.bytes_sent(self.buffer_bytes())

    # -- overlapped mixing -----------------------------------------------------------
    def start(self, k: int, sources: dict[int, list[torch.Tensor]]) -> MixInFlight:
        """Post P_k's communication without waiting, reading each local agent ``a`` from ``sources[a]``.

        ``sources`` holds one snapshot per local agent, buffers shaped like the
        agent's that nothing else writes until :meth:`finish`; the engine may
        use them as scratch (an all-reduce of a single agent runs in its
        snapshot). Every rank calls it for the same k.
        """
        plan = self.plan(k)
        self._check_agents()
        missing = [a for a in self.local_agents if a not in sources]
        if missing:
            raise ConfigError(f"rank {self.rank}: mixing step {k} was started without snapshots of agents {missing}")
        ngroups = len(next(iter(self.agents.values())))
        parts, reduced, received = [], [], {}
        for ar in plan.allreduces:
            single = len(ar.receivers) == 1 and len(ar.coeffs) == 1 and ar.coeffs[0][0] == ar.receivers[0]
            for g in range(ngroups):
                if single:
                    buf = sources[ar.receivers[0]][g]
                    buf.mul_(ar.coeffs[0][1])
                else:
                    buf = self._scratch(("allreduce", ar.ranks, g), self.agents[ar.receivers[0]][g])
                    buf.zero_()
                    for i, c in ar.coeffs:
                        buf.add_(sources[i][g], alpha=c)
                parts.append(self.comm.start_all_reduce_sum(buf, ar.ranks))
                reduced.append((ar.receivers, g, buf))
        if plan.exchange is not None:
            ex = plan.exchange
            sends, recvs = [], []
            for g in range(ngroups):
                for peer, agents in ex.sends:
                    for i in agents:
                        sends.append((peer, sources[i][g]))
                for peer, agents in ex.recvs:
                    for i in agents:
                        received[(i, g)] = self._scratch(("recv", i, g, peer), next(iter(self.agents.values()))[g])
                        recvs.append((peer, received[(i, g)]))
            parts.append(self.comm.start_exchange(sends, recvs))
        peers = _Peers([part.peers for part in parts])
        pending = Pending.merge(self.comm, _StepText(k, peers), peers, parts)
        return MixInFlight(k, plan, sources, pending, reduced, received)

    @torch.no_grad()
    def finish(self, inflight: MixInFlight) -> None:
        """Wait for :meth:`start`'s communication and write x_j <- sum_i w_ij snapshot_i into every local agent.

        A local agent that P_k leaves alone takes its snapshot back. The
        arithmetic is :meth:`mix`'s, in the same order.
        """
        inflight.pending.wait()
        plan, sources = inflight.plan, inflight.sources
        ngroups = len(next(iter(self.agents.values())))
        written = set()
        for receivers, g, buf in inflight.reduced:
            for j in receivers:
                self.agents[j][g].copy_(buf)
                written.add(j)
        for part in (plan.exchange, plan.local):
            if part is None:
                continue
            for g in range(ngroups):
                for j, ws in part.combine:
                    dst, own = self.agents[j][g], sources[j][g]
                    self_w = next((w for i, w in ws if i == j), 0.0)
                    if self_w == 0.0:
                        dst.zero_()
                    elif self_w == 1.0:
                        dst.copy_(own)
                    else:
                        torch.mul(own, self_w, out=dst)
                    for i, w in ws:
                        if i != j:
                            dst.add_(sources[i][g] if i in sources else inflight.received[(i, g)], alpha=w)
                    written.add(j)
        for a in self.local_agents:
            if a not in written:
                for dst, src in zip(self.agents[a], sources[a]):
                    dst.copy_(src)
        if not plan.is_noop:
            self.bytes_sent += plan.bytes_sent(self.buffer_bytes())

    def _allreduce(self, ar, ngroups: int) -> None:
        single = len(ar.receivers) == 1 and len(ar.coeffs) == 1 and ar.coeffs[0][0] == ar.receivers[0]
        for g in range(ngroups):
            if single:
                buf = self.agents[ar.receivers[0]][g]
                buf.mul_(ar.coeffs[0][1])
            else:
                buf = self._scratch(("allreduce", ar.ranks, g), self.agents[ar.receivers[0]][g])
                buf.zero_()
                for i, c in ar.coeffs:
                    buf.add_(self.agents[i][g], alpha=c)
            self.comm.all_reduce_sum(buf, ar.ranks)
            if not single:
                for j in ar.receivers:
                    self.agents[j][g].copy_(buf)

    def _exchange(self, plan: Plan, ngroups: int) -> None:
        ex = plan.exchange
        sends, recvs = [], []
        received: dict[tuple[int, int], torch.Tensor] = {}
        for g in range(ngroups):
            for peer, agents in ex.sends:
                for i in agents:
                    sends.append((peer, self.agents[i][g]))
            for peer, agents in ex.recvs:
                for i in agents:
                    received[(i, g)] = self._scratch(("recv", i, g, peer), next(iter(self.agents.values()))[g])
                    recvs.append((peer, received[(i, g)]))
        self.comm.exchange(sends, recvs)
        self._combine(ex.combine, received, ngroups)

    def _scratch(self, key, like: torch.Tensor) -> torch.Tensor:
        """A buffer shaped like ``like``, allocated once per key and reused every step."""
        buf = self._scratch_cache.get(key)
        if buf is None:
            buf = self._scratch_cache[key] = torch.empty_like(like)
        return buf

    def _combine(self, combine, received, ngroups: int) -> None:
        """x_j <- sum_i w_ij x_i for each local receiver j, reading sources before any write."""
        # In place is safe when each receiver reads no other local agent.
        in_place = all(all(i == j or i not in self.agents for i, _ in ws) for j, ws in combine)
        for g in range(ngroups):
            outs = []
            for j, ws in combine:
                dst = self.agents[j][g] if in_place else self._scratch(("combine", j, g), self.agents[j][g])
                self_w = next((w for i, w in ws if i == j), 0.0)
                if in_place:
                    if self_w == 0.0:
                        dst.zero_()
                    elif self_w != 1.0:
                        dst.mul_(self_w)
                else:
                    dst.zero_()
                    if self_w:
                        dst.add_(self.agents[j][g], alpha=self_w)
                for i, w in ws:
                    if i == j:
                        continue
                    src = self.agents[i][g] if i in self.agents else received[(i, g)]
                    dst.add_(src, alpha=w)
                outs.append((j, dst))
            if not in_place:
                for j, dst in outs:
                    self.agents[j][g].copy_(dst)

    def describe(self) -> str:
        lines = [f"rank {self.rank}: agents {list(self.local_agents)}"]
        for idx, (ph, plan) in enumerate(zip(self.schedule.phases, self.plans)):
            kinds = []
            if plan.allreduces:
                kinds.append(f"{len(plan.allreduces)} all-reduce(s) over {[ar.ranks for ar in plan.allreduces]}")
            if plan.exchange:
                kinds.append(f"exchange: send to {list(plan.send_peers())}")
            if plan.local:
                kinds.append("local")
            lines.append(f"  phase {idx} x{ph.repeat}: " + ("; ".join(kinds) or "nothing"))
        return "\n".join(lines)
