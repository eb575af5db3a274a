"""From a mixing matrix to communication: the plan compiler.

Given P (column j = the weights agent j takes from every agent), the placement
(agent -> rank) and one rank, :func:`compile_plan` returns the least
communication that realises X <- X P for the agents on that rank:

==========================================================  ==========================================
structure of P                                              primitive
==========================================================  ==========================================
identity                                                    nothing
entries only between agents on the same rank                local arithmetic
a block whose receiving columns are all equal (c 1^T)       one weighted all-reduce: SUM of c_i x_i
any other sparse pattern                                    batched send/recv of one flat buffer per
                                                            (agent, peer rank), then a weighted combine
==========================================================  ==========================================

The blocks are the connected components of P's graph (i ~ j when P[i, j] != 0).

Cost. P is a :class:`~lookahead_dist.mixing.Phase` (a dense matrix is wrapped in one). What
every rank must agree on, the components, which of them are all-reduces and over which ranks,
is computed once per phase and placement from the stored entries (O(nnz), vectorized; an
averaging block from its sizes, O(n)) and cached on the phase, so that ranks compiled in one
process share it. A rank's own plan then reads only its own agents' columns and rows: O(its
degree) per phase, plus one vectorized scan of the placement for its agents. Exact averaging over
65,536 ranks (``complete``) is one all-reduce whose plan holds this rank's one coefficient.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lookahead_dist.mixing import Phase, _component_labels, components  # components: re-exported here

__all__ = [
    "AllReduce",
    "Exchange",
    "LocalCombine",
    "Plan",
    "compile_plan",
    "components",
    "group_rank_sets",
    "send_peer_counts",
]

Weights = tuple[tuple[int, float], ...]  # ((source agent, weight), ...)


@dataclass(frozen=True)
class AllReduce:
    """All-reduce SUM over ``ranks`` of sum_i coeff_i x_i; every local receiver gets the result."""

    ranks: tuple[int, ...]
    coeffs: Weights  # this rank's (local agent, weight) contributions
    receivers: tuple[int, ...]  # this rank's local agents that take the result


@dataclass(frozen=True)
class Exchange:
    """Batched point-to-point exchange, then for each local receiver j: x_j <- sum_i w_ij x_i."""

    sends: tuple[tuple[int, tuple[int, ...]], ...]  # (peer rank, local agents sent to it, in order)
    recvs: tuple[tuple[int, tuple[int, ...]], ...]  # (peer rank, remote agents received from it, in order)
    combine: tuple[tuple[int, Weights], ...]  # (local receiver, ((source, weight), ...)), self first


@dataclass(frozen=True)
class LocalCombine:
    """x_j <- sum_i w_ij x_i among agents that all live on this rank."""

    combine: tuple[tuple[int, Weights], ...]


@dataclass(frozen=True)
class Plan:
    """What one rank does for one phase."""

    rank: int
    allreduces: tuple[AllReduce, ...] = ()
    exchange: Exchange | None = None
    local: LocalCombine | None = None

    @property
    def is_noop(self) -> bool:
        return not self.allreduces and self.exchange is None and self.local is None

    def messages(self) -> int:
        """Buffers this rank sends point to point in this phase (all-reduces counted once each)."""
        sent = sum(len(agents) for _, agents in self.exchange.sends) if self.exchange else 0
        return sent + len(self.allreduces)

    def send_peers(self) -> tuple[int, ...]:
        return tuple(peer for peer, _ in self.exchange.sends) if self.exchange else ()

    def bytes_sent(self, buffer_bytes: int) -> int:
        """Bytes this rank sends, for agents of ``buffer_bytes`` each.

        Point to point: exactly the buffers sent. An all-reduce over p ranks is
        counted as a bandwidth-optimal ring all-reduce: 2 (p - 1) / p buffers.
        """
        total = sum(len(a) for _, a in self.exchange.sends) * buffer_bytes if self.exchange else 0
        for ar in self.allreduces:
            p = len(ar.ranks)
            total += (2 * (p - 1) * buffer_bytes) // p
        return total


def _as_phase(P) -> Phase:
    return P if isinstance(P, Phase) else Phase(np.asarray(P, dtype=np.float64))


def _placement_array(placement, n: int) -> np.ndarray:
    pl = np.asarray(placement)
    if pl.ndim != 1 or pl.shape[0] != n:
        raise ValueError(f"placement has {len(placement)} entries for {n} agents")
    return pl.astype(np.int64, copy=False)


def _column_weights(ph: Phase, j: int) -> Weights:
    """Sources of receiver j with their weights, j itself first when it keeps a weight."""
    src, w = ph.column(j)
    pairs = sorted(zip(src.tolist(), w.tolist()), key=lambda t: (t[0] != j, t[0]))
    return tuple(pairs)


def _members(ph: Phase):
    """(agents sorted by component, start of each component in it), cached on the phase."""

    def build():
        labels, count = _component_labels(ph)
        order = np.argsort(labels, kind="stable")
        return order, np.searchsorted(labels[order], np.arange(count + 1))

    return ph.memo("members", build)


def _equal_columns(ph: Phase) -> np.ndarray:
    """For every component: are all its receiving columns equal? O(nnz), cached on the phase."""

    def build():
        labels, count = _component_labels(ph)
        if ph.averaging is not None:
            return np.ones(count, dtype=bool)
        n, C = ph.n, ph.csc
        first = np.full(count, n, dtype=np.int64)
        np.minimum.at(first, labels, np.arange(n))
        f = first[labels]
        nnz = np.diff(C.indptr)
        ok = nnz == nnz[f]
        js = np.flatnonzero(ok & (np.arange(n) != f))
        lens = nnz[js]
        within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        pos_j = np.repeat(C.indptr[js], lens) + within
        pos_f = np.repeat(C.indptr[f[js]], lens) + within
        same = (C.indices[pos_j] == C.indices[pos_f]) & (C.data[pos_j] == C.data[pos_f])
        ok[js[np.repeat(np.arange(js.size), lens)[~same]]] = False
        equal = np.ones(count, dtype=bool)
        equal[labels[~ok]] = False
        return equal

    return ph.memo("equal_columns", build)


def _is_identity_singleton(ph: Phase) -> np.ndarray:
    """For every component: a single agent that keeps itself (P[j, j] = 1)."""

    def build():
        labels, count = _component_labels(ph)
        sizes = np.bincount(labels, minlength=count)
        if ph.averaging is not None:
            return sizes == 1
        C = ph.csc
        keeps = (np.diff(C.indptr) == 1) & np.isin(np.arange(ph.n), C.indices[C.data == 1.0])
        out = np.zeros(count, dtype=bool)
        single = sizes[labels] == 1
        out[labels[single]] = keeps[single]
        return out

    return ph.memo("identity_singletons", build)


SKIP, LOCAL, ALLREDUCE, EXCHANGE = 0, 1, 2, 3


class RankSet(tuple):
    """The sorted ranks of an all-reduce: a tuple whose hash is computed once (65,536 ranks are hashed often)."""

    def __hash__(self):
        h = self.__dict__.get("_hash")
        if h is None:
            h = self.__dict__["_hash"] = tuple.__hash__(self)
        return h


class _Placed:
    """A phase's components classified for one placement: the part of a plan every rank agrees on."""

    def __init__(self, ph: Phase, pl: np.ndarray):
        labels, count = _component_labels(ph)
        lo = np.full(count, np.iinfo(np.int64).max)
        hi = np.full(count, -1)
        np.minimum.at(lo, labels, pl)
        np.maximum.at(hi, labels, pl)
        kind = np.where(lo == hi, LOCAL, np.where(_equal_columns(ph), ALLREDUCE, EXCHANGE))
        kind[_is_identity_singleton(ph)] = SKIP
        self.ph, self.pl, self.labels, self.kind = ph, pl, labels, kind
        self._ranks: dict[int, tuple[int, ...]] = {}

    def ranks(self, comp: int) -> tuple[int, ...]:
        """The sorted ranks hosting component ``comp``."""
        if comp not in self._ranks:
            order, starts = _members(self.ph)
            members = order[starts[comp] : starts[comp + 1]]
            self._ranks[comp] = RankSet(np.unique(self.pl[members]).tolist())
        return self._ranks[comp]

    def group_rank_sets(self) -> list[tuple[int, ...]]:
        return [self.ranks(c) for c in np.flatnonzero(self.kind == ALLREDUCE).tolist()]


def _placed(ph: Phase, pl: np.ndarray) -> _Placed:
    return ph.memo(("placed", pl.tobytes()), lambda: _Placed(ph, pl))


def group_rank_sets(P, placement) -> list[tuple[int, ...]]:
    """Rank sets of the all-reduces that P needs, in the order every rank issues them.

    Process groups must be created by every rank, members or not, in the same
    order: the engine calls this for each phase before compiling its plan.
    O(nnz) once per phase and placement (cached on a :class:`Phase`), never O(n^2).
    """
    ph = _as_phase(P)
    return list(_placed(ph, _placement_array(placement, ph.n)).group_rank_sets())


def compile_plan(P, placement, rank: int) -> Plan:
    """The communication that realises X <- X P for the agents on ``rank``.

    ``P`` is a :class:`~lookahead_dist.mixing.Phase` or a dense matrix; ``placement[i]``
    is the rank of agent i. Every rank compiles the same components in the same order,
    so the collectives it issues line up. Reads only this rank's columns and rows.
    """
    ph = _as_phase(P)
    pl = _placement_array(placement, ph.n)
    info = _placed(ph, pl)
    mine = np.flatnonzero(pl == rank)
    comps = info.labels[mine]
    order = np.lexsort((mine, comps))
    mine, comps = mine[order].tolist(), comps[order].tolist()
    allreduces: list[AllReduce] = []
    exchange_comb: list[tuple[int, Weights]] = []
    local_comb: list[tuple[int, Weights]] = []
    sends: dict[int, list[int]] = {}
    recvs: dict[int, list[int]] = {}
    k = 0
    while k < len(mine):
        comp, start = comps[k], k
        while k < len(mine) and comps[k] == comp:
            k += 1
        agents = mine[start:k]
        kind = int(info.kind[comp])
        if kind == LOCAL:
            local_comb.extend((j, _column_weights(ph, j)) for j in agents)
        elif kind == ALLREDUCE:
            src, w = ph.column(agents[0])  # every column of the component is this one
            c = dict(zip(src.tolist(), w.tolist()))
            coeffs = tuple((i, c[i]) for i in agents if c.get(i, 0.0) != 0.0)
            allreduces.append(AllReduce(info.ranks(comp), coeffs, tuple(agents)))
        elif kind == EXCHANGE:
            for j in agents:
                w = _column_weights(ph, j)
                exchange_comb.append((j, w))
                for i, _ in w:
                    r = int(pl[i])
                    if r != rank and i not in recvs.setdefault(r, []):
                        recvs[r].append(i)
            for i in agents:
                for j in ph.row(i)[0].tolist():
                    r = int(pl[j])
                    if r != rank and i not in sends.setdefault(r, []):
                        sends[r].append(i)
    exchange = None
    if exchange_comb or any(sends.values()):
        exchange = Exchange(
            tuple((r, tuple(sorted(a))) for r, a in sorted(sends.items()) if a),
            tuple((r, tuple(sorted(a))) for r, a in sorted(recvs.items()) if a),
            tuple(exchange_comb),
        )
    local = LocalCombine(tuple(local_comb)) if local_comb else None
    return Plan(rank, tuple(allreduces), exchange, local)


def send_peer_counts(P, placement) -> np.ndarray:
    """For every rank, the number of distinct other ranks it sends to point to point (``len(plan.send_peers())``).

    Vectorized over the stored entries, O(nnz log nnz), for every rank at once.
    """
    ph = _as_phase(P)
    pl = _placement_array(placement, ph.n)
    info = _placed(ph, pl)
    world = int(pl.max()) + 1
    if ph.averaging is not None:
        return np.zeros(world, dtype=np.int64)
    rows, cols, _ = ph.entries()
    keep = (info.kind[info.labels[rows]] == EXCHANGE) & (pl[rows] != pl[cols])
    pairs = np.unique(pl[rows[keep]] * world + pl[cols[keep]])
    return np.bincount(pairs // world, minlength=world)
