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
Everything here is pure Python/NumPy, the same on every rank, so plans are
compiled once per distinct phase and cached by the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lookahead_dist.mixing import components  # one union-find for every caller; re-exported here

__all__ = ["AllReduce", "Exchange", "LocalCombine", "Plan", "compile_plan", "components", "group_rank_sets"]

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


def _column_weights(P: np.ndarray, j: int) -> Weights:
    """Sources of receiver j with their weights, j itself first when it keeps a weight."""
    src = [int(i) for i in np.flatnonzero(P[:, j])]
    src.sort(key=lambda i: (i != j, i))
    return tuple((i, float(P[i, j])) for i in src)


def _classify(P: np.ndarray, placement: tuple[int, ...]):
    """Yield (kind, component, ranks) for every component that moves something.

    kind is "local" (one rank), "allreduce" (equal receiving columns) or "exchange".
    """
    for comp in components(P):
        sub = P[np.ix_(comp, comp)]
        if np.array_equal(sub, np.eye(len(comp))):
            continue  # agents that keep themselves
        comp_ranks = tuple(sorted({placement[i] for i in comp}))
        if len(comp_ranks) == 1:
            yield "local", comp, comp_ranks
            continue
        first = P[:, comp[0]]
        if all(np.array_equal(P[:, j], first) for j in comp[1:]):
            yield "allreduce", comp, comp_ranks
        else:
            yield "exchange", comp, comp_ranks


def group_rank_sets(P, placement) -> list[tuple[int, ...]]:
    """Rank sets of the all-reduces that P needs, in the order every rank issues them.

    Process groups must be created by every rank, members or not, in the same
    order: the engine calls this for each phase before compiling its plan.
    """
    placement = tuple(int(r) for r in placement)
    return [ranks for kind, _, ranks in _classify(np.asarray(P, dtype=np.float64), placement) if kind == "allreduce"]


def compile_plan(P: np.ndarray, placement, rank: int) -> Plan:
    """The communication that realises X <- X P for the agents on ``rank``.

    ``placement[i]`` is the rank of agent i. Every rank compiles the same
    components in the same order, so the collectives it issues line up.
    """
    P = np.asarray(P, dtype=np.float64)
    placement = tuple(int(r) for r in placement)
    n = P.shape[0]
    if len(placement) != n:
        raise ValueError(f"placement has {len(placement)} entries for {n} agents")
    local_agents = {i for i in range(n) if placement[i] == rank}
    allreduces: list[AllReduce] = []
    exchange_comb: list[tuple[int, Weights]] = []
    local_comb: list[tuple[int, Weights]] = []
    sends: dict[int, list[int]] = {}
    recvs: dict[int, list[int]] = {}
    for kind, comp, comp_ranks in _classify(P, placement):
        mine = [i for i in comp if i in local_agents]
        if not mine:
            continue
        if kind == "local":
            local_comb.extend((j, _column_weights(P, j)) for j in mine)
        elif kind == "allreduce":
            first = P[:, comp[0]]
            coeffs = tuple((i, float(first[i])) for i in mine if first[i] != 0.0)
            allreduces.append(AllReduce(comp_ranks, coeffs, tuple(mine)))
        else:
            for j in mine:
                w = _column_weights(P, j)
                exchange_comb.append((j, w))
                for i, _ in w:
                    r = placement[i]
                    if r != rank and i not in recvs.setdefault(r, []):
                        recvs[r].append(i)
            for i in mine:
                for j in np.flatnonzero(P[i, :]).tolist():
                    r = placement[j]
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
