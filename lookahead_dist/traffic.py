"""What every rank moves in one phase: the input of the cost model (:mod:`lookahead_dist.costmodel`).

Two forms:

* :class:`PhaseTraffic`, the whole phase as arrays: one entry per (sender rank,
  receiver rank) message with its bytes, every rank's combine bytes, the distinct
  all-reduce groups (their ranks, flat, with offsets) and one entry per (rank,
  all-reduce it runs), in the order the rank runs them. :func:`phase_traffic`
  derives it from the phase's stored entries and the placement in O(nnz log nnz)
  numpy work, the same for every placement, without compiling any rank's plan
  (an averaging block, e.g. ``complete`` over 65,536 ranks, in O(n)).
* :class:`RankTraffic`, one rank's messages, groups and combine bytes read from
  its compiled :class:`~lookahead_dist.plan.Plan` (:func:`rank_traffic`);
  :func:`traffic_of_phase` compiles them for every rank (or, for a phase invariant
  under a shift of the ranks, for the first few and shifts the rest). This is the
  reference the array form is tested against, and
  :meth:`PhaseTraffic.from_ranks` turns such a list into arrays.

Both give the same counts: rank A sends agent i to rank B when i lives on A and
some agent on B takes a weight from it, in a component the plan compiler makes an
exchange; the receiver's combine reads every source of its column and itself;
an all-reduce reads its coefficients and itself and writes every receiver.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lookahead_dist.mixing import Phase
from lookahead_dist.plan import ALLREDUCE, EXCHANGE, LOCAL, Plan, _placed, compile_plan

__all__ = ["RankTraffic", "PhaseTraffic", "rank_traffic", "traffic_of_phase", "phase_traffic"]


@dataclass(frozen=True)
class RankTraffic:
    """What one rank moves in one phase: (peer, bytes) sent and received, all-reduce groups, combine bytes."""

    rank: int
    sends: tuple[tuple[int, int], ...] = ()
    recvs: tuple[tuple[int, int], ...] = ()
    allreduces: tuple[tuple[int, ...], ...] = ()
    combine_bytes: int = 0

    def shifted(self, by: int, world: int) -> "RankTraffic":
        """The traffic of rank ``rank + by`` under the symmetry r -> r + by (mod world) of the schedule."""

        def s(r):
            return (r + by) % world

        groups = tuple(g if len(g) == world else tuple(sorted(s(r) for r in g)) for g in self.allreduces)
        return RankTraffic(
            s(self.rank),
            tuple(sorted((s(p), b) for p, b in self.sends)),
            tuple(sorted((s(p), b) for p, b in self.recvs)),
            groups,
            self.combine_bytes,
        )


def rank_traffic(plan: Plan, buffer_bytes: int) -> RankTraffic:
    """The messages, all-reduce groups and combine bytes of one compiled plan, for agents of ``buffer_bytes``."""
    sends, recvs, combine = (), (), 0
    if plan.exchange is not None:
        ex = plan.exchange
        sends = tuple((peer, len(agents) * buffer_bytes) for peer, agents in ex.sends)
        recvs = tuple((peer, len(agents) * buffer_bytes) for peer, agents in ex.recvs)
        combine += sum((len(ws) + 1) * buffer_bytes for _, ws in ex.combine)
    if plan.local is not None:
        combine += sum((len(ws) + 1) * buffer_bytes for _, ws in plan.local.combine)
    for ar in plan.allreduces:
        combine += (len(ar.coeffs) + 1 + len(ar.receivers)) * buffer_bytes
    return RankTraffic(plan.rank, sends, recvs, tuple(ar.ranks for ar in plan.allreduces), combine)


def _as_phase(P) -> Phase:
    return P if isinstance(P, Phase) else Phase(np.asarray(P, dtype=np.float64))


def _symmetry(P: Phase, placement: tuple[int, ...], candidates) -> int | None:
    """The smallest s in ``candidates`` with P invariant under agent (= rank) i -> i + s mod n, if any."""
    n = P.n
    if placement != tuple(range(n)):
        return None
    for s in sorted({int(c) for c in candidates if 0 < c < n and n % c == 0}):
        if P.shift_invariant(s):
            return s
    return None


def traffic_of_phase(P, placement, buffer_bytes: int, cache: dict | None = None) -> list[RankTraffic]:
    """Every rank's :class:`RankTraffic` for one phase, from compiled plans, as few as the schedule's symmetry allows.

    When P (one agent per rank) is invariant under r -> r + s (s the smallest such divisor of n), only
    ranks 0 .. s - 1 are compiled and the others are their shifts; otherwise every rank is compiled.
    ``cache`` (a dict) keeps plans across calls, keyed by the matrix's stored entries. ``P`` is a
    :class:`~lookahead_dist.mixing.Phase` (read sparsely) or a dense matrix. :func:`phase_traffic`
    gives the same as arrays, faster.
    """
    P = _as_phase(P)
    placement = tuple(int(r) for r in placement)
    world = max(placement) + 1
    key = (P.n, P.digest(), placement)
    plans = None if cache is None else cache.get(key)
    if plans is None:
        n = P.n
        s = _symmetry(P, placement, [d for d in range(1, n // 2 + 1) if n % d == 0 and d <= 4096])
        base = [compile_plan(P, placement, r) for r in range(s if s else world)]
        plans = (s, base)
        if cache is not None:
            cache[key] = plans
    s, base = plans
    first = [rank_traffic(p, buffer_bytes) for p in base]
    if not s:
        return first
    return [first[r % s].shifted(r - r % s, world) if r >= s else first[r] for r in range(world)]


_I64 = np.int64


@dataclass(frozen=True, eq=False)
class PhaseTraffic:
    """One phase's traffic on every rank, as arrays (all int64; ranks 0 .. world - 1).

    ``send_src``, ``send_dst``, ``send_bytes``: one point-to-point message per (sender, receiver) pair;
    ``recv_rank``, ``recv_peer``: one entry per (receiver, sender) pair (the same pairs reversed, for a
    phase); ``combine_bytes[r]``: the bytes rank r's combine reads and writes; ``group_ranks`` and
    ``group_ptr``: the distinct all-reduce groups, group g = ``group_ranks[group_ptr[g]:group_ptr[g + 1]]``
    (its ring order), groups in the order the ranks first run them (rank 0's first); ``member_rank``,
    ``member_group``: one entry per all-reduce a rank runs, by rank, in the order it runs them.
    """

    world: int
    send_src: np.ndarray
    send_dst: np.ndarray
    send_bytes: np.ndarray
    recv_rank: np.ndarray
    recv_peer: np.ndarray
    combine_bytes: np.ndarray
    group_ranks: np.ndarray
    group_ptr: np.ndarray
    member_rank: np.ndarray
    member_group: np.ndarray

    def scaled(self, factor: int) -> "PhaseTraffic":
        """The same traffic with every byte count multiplied by ``factor`` (counts in buffers -> bytes)."""
        f = _I64(factor)
        return PhaseTraffic(
            self.world,
            self.send_src,
            self.send_dst,
            self.send_bytes * f,
            self.recv_rank,
            self.recv_peer,
            self.combine_bytes * f,
            self.group_ranks,
            self.group_ptr,
            self.member_rank,
            self.member_group,
        )

    def group(self, g: int) -> tuple[int, ...]:
        return tuple(self.group_ranks[self.group_ptr[g] : self.group_ptr[g + 1]].tolist())

    @classmethod
    def from_ranks(cls, traffic: list[RankTraffic]) -> "PhaseTraffic":
        """The arrays of a list of per-rank traffic (rank r at position r); groups deduplicated by their ranks."""
        ss, sd, sb, rr, rp, mr, mg = [], [], [], [], [], [], []
        groups: dict[tuple[int, ...], int] = {}
        for t in traffic:
            for peer, b in t.sends:
                ss.append(t.rank), sd.append(peer), sb.append(b)
            for peer, _ in t.recvs:
                rr.append(t.rank), rp.append(peer)
            for g in t.allreduces:
                mr.append(t.rank), mg.append(groups.setdefault(tuple(g), len(groups)))
        flat = [r for g in groups for r in g]
        ptr = np.cumsum([0] + [len(g) for g in groups])

        def a(x):
            return np.asarray(x, dtype=_I64).reshape(-1)

        combine = a([0] * len(traffic))
        for t in traffic:
            combine[t.rank] = t.combine_bytes
        return cls(len(traffic), a(ss), a(sd), a(sb), a(rr), a(rp), combine, a(flat), a(ptr), a(mr), a(mg))

    def ranks(self) -> list[RankTraffic]:
        """Back to one :class:`RankTraffic` per rank (bytes as Python ints)."""
        out = []
        groups = [self.group(g) for g in range(len(self.group_ptr) - 1)]
        sends: list[list] = [[] for _ in range(self.world)]
        recvs: list[list] = [[] for _ in range(self.world)]
        ars: list[list] = [[] for _ in range(self.world)]
        for s, d, b in zip(self.send_src.tolist(), self.send_dst.tolist(), self.send_bytes.tolist()):
            sends[s].append((d, b))
        nbytes = {
            (s, d): b for s, d, b in zip(self.send_src.tolist(), self.send_dst.tolist(), self.send_bytes.tolist())
        }
        for r, p in zip(self.recv_rank.tolist(), self.recv_peer.tolist()):
            recvs[r].append((p, nbytes.get((p, r), 0)))
        for r, g in zip(self.member_rank.tolist(), self.member_group.tolist()):
            ars[r].append(groups[g])
        for r in range(self.world):
            out.append(RankTraffic(r, tuple(sends[r]), tuple(recvs[r]), tuple(ars[r]), int(self.combine_bytes[r])))
        return out


def _segment_gather(indptr: np.ndarray, indices: np.ndarray, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position of each gathered entry in ``which``, the entries) of the CSR/CSC slices ``which``."""
    lens = (indptr[which + 1] - indptr[which]).astype(_I64)
    owner = np.repeat(np.arange(which.size), lens)
    within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
    return owner, indices[np.repeat(indptr[which], lens) + within]


def _unique(a: np.ndarray, counts: bool = False):
    """np.unique by sorting (the sorted distinct values, and how often each occurs)."""
    s = np.sort(a, kind="stable")
    first = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if s.size else np.zeros(0, dtype=_I64)
    if not counts:
        return s[first]
    return s[first], np.diff(np.r_[first, s.size]).astype(_I64)


def _counts(ph: Phase, pl: np.ndarray) -> PhaseTraffic:
    """The phase's traffic in buffers (one buffer per agent sent or combined), O(nnz log nnz)."""
    info = _placed(ph, pl)
    labels, kind = info.labels, info.kind
    n, world, ncomp = ph.n, int(pl.max()) + 1, kind.size
    akind = kind[labels]
    avg = ph.averaging
    colnnz = np.full(n, avg.b, dtype=_I64) if avg is not None else np.diff(ph.csc.indptr).astype(_I64)
    # exchange and local receivers read every source and themselves
    rec = (akind == LOCAL) | (akind == EXCHANGE)
    combine = np.bincount(pl[rec], weights=colnnz[rec] + 1, minlength=world).astype(_I64)

    # all-reduces: one per (rank, component), by rank then component (the plan's order)
    agents = np.flatnonzero(akind == ALLREDUCE)
    pair, receivers = _unique(pl[agents] * ncomp + labels[agents], counts=True)
    member_rank, member_comp = pair // ncomp, pair % ncomp
    if avg is not None:
        coeffs = receivers
    else:  # this rank's agents with a weight in the component's (common) column
        first = np.full(ncomp, n, dtype=_I64)
        np.minimum.at(first, labels[agents], agents)
        comps = np.flatnonzero(kind == ALLREDUCE)
        owner, src = _segment_gather(ph.csc.indptr, ph.csc.indices, first[comps])
        hit = np.searchsorted(pair, pl[src] * ncomp + comps[owner])
        coeffs = np.bincount(hit, minlength=pair.size)
    combine += np.bincount(member_rank, weights=coeffs + 1 + receivers, minlength=world).astype(_I64)
    # the groups: the ranks of each component, components ordered by their smallest rank
    by_comp = np.lexsort((member_rank, member_comp))
    comp_of, ranks_of = member_comp[by_comp], member_rank[by_comp]
    starts = np.flatnonzero(np.r_[True, comp_of[1:] != comp_of[:-1]]) if comp_of.size else np.zeros(0, _I64)
    comps = comp_of[starts]
    order = np.lexsort((comps, ranks_of[starts]))
    ends = np.r_[starts[1:], comp_of.size].astype(_I64)
    if member_rank.size and np.bincount(member_rank).max() > 1:  # a rank in several groups: some may repeat
        index: dict[tuple[int, ...], int] = {}
        comp_group = np.empty(ncomp, dtype=_I64)
        for k in order.tolist():
            g = tuple(ranks_of[starts[k] : ends[k]].tolist())
            comp_group[comps[k]] = index.setdefault(g, len(index))
        flat = np.asarray([r for g in index for r in g], dtype=_I64)
        ptr = np.cumsum([0] + [len(g) for g in index]).astype(_I64)
    else:  # disjoint groups, one per component
        lens = (ends - starts)[order]
        within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        flat = ranks_of[np.repeat(starts[order], lens) + within]
        ptr = np.r_[0, np.cumsum(lens)].astype(_I64)
        comp_group = np.empty(ncomp, dtype=_I64)
        comp_group[comps[order]] = np.arange(order.size)
    member_group = comp_group[member_comp] if member_comp.size else member_comp

    # exchanges: agent i goes from its rank to every other rank holding an agent that takes from it
    if avg is None:
        rows, cols, _ = ph.entries()
        ex = (kind[labels[rows]] == EXCHANGE) & (pl[rows] != pl[cols])
        if np.array_equal(pl, np.arange(n)):  # one agent per rank: every stored entry is its own message
            edge = np.sort(rows[ex] * world + cols[ex])
            count = np.ones(edge.size, dtype=_I64)
        else:
            sent = _unique(rows[ex] * world + pl[cols[ex]])  # distinct (agent, receiving rank)
            edge, count = _unique(pl[sent // world] * world + sent % world, counts=True)
    else:  # an averaging block is all-reduces and local averages
        edge = count = np.zeros(0, dtype=_I64)
    src, dst = edge // world, edge % world
    recv = np.sort(dst * world + src)
    return PhaseTraffic(
        world, src, dst, count.astype(_I64), recv // world, recv % world, combine, flat, ptr, member_rank, member_group
    )


def phase_traffic(P, placement, buffer_bytes: int, cache: dict | None = None) -> PhaseTraffic:
    """One phase's :class:`PhaseTraffic` for agents of ``buffer_bytes`` placed by ``placement`` (agent -> rank).

    Derived from the stored entries in O(nnz log nnz), vectorized, for any placement; the counts are
    kept on the phase (and in ``cache``, a dict, keyed by the matrix's stored entries and the
    placement) so that schedules sharing a phase derive it once.
    """
    ph = _as_phase(P)
    pl = np.asarray(placement, dtype=_I64).reshape(-1)
    if pl.size != ph.n:
        raise ValueError(f"placement has {pl.size} entries for {ph.n} agents")
    key = ("traffic", pl.tobytes())
    counts = None
    if cache is not None:
        ckey = ("phase_traffic", ph.n, ph.digest(), key[1])
        counts = cache.get(ckey)
    if counts is None:
        counts = ph.memo(key, lambda: _counts(ph, pl))
        if cache is not None:
            cache[ckey] = counts
    return counts.scaled(buffer_bytes)
