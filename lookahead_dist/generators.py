"""Built-in mixing-matrix generators, built sparsely (networkx only for :func:`metropolis_hastings`).

Length: just over 500 lines: every built-in generator, its sparse construction beside its dense form,
its parameter rules and the size limits the loader relies on; the registry needs them all in one place.

Every generator follows the library's convention: column j of P holds the weights
agent j takes from every agent (X_{k+1} = X_k P, paper eq. 4), so every column sums
to 1. The registry (:data:`GENERATORS`, ``Generator.phases``) builds each phase
sparsely in O(n x degree) time and memory, straight from index arithmetic:
:class:`~lookahead_dist.mixing.Phase` objects over ``scipy.sparse`` matrices, or an
:class:`~lookahead_dist.mixing.Averaging` block for exact averaging (``complete``,
the intra-node phase of ``hierarchical``), which is O(1) at any size. The functions
named after each generator (:func:`ring`, :func:`torus`, ...) return the same matrix
dense, up to :data:`~lookahead_dist.mixing.MAX_DENSE_AGENTS` agents.

Undirected generators (:func:`ring`, :func:`torus`, :func:`star`,
:func:`hypercube`) use Metropolis-Hastings weights (:func:`metropolis_hastings`):
symmetric and doubly stochastic, so their invariant vector is a = 1/n.

Limits: at most :data:`MAX_AGENTS` = 2^19 = 524,288 agents. The largest built-in
phase there, the exponential graph, stores 20 entries per column (126 MB); loading
checks every phase in O(its stored entries) and a 65,536-agent one-peer exponential
schedule (16 phases) loads and validates in well under a second.

>>> ring(4)[0].tolist()
[0.33333333333333337, 0.3333333333333333, 0.0, 0.3333333333333333]
>>> GENERATORS["torus"].signature()
'torus(rows: int, cols: int)'
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Optional

import networkx as nx
import numpy as np
import scipy.sparse as sp

from lookahead_dist.errors import ConfigError, MixingError, TopologyError
from lookahead_dist.mixing import DENSE_FINGERPRINT_AGENTS, MAX_DENSE_AGENTS, Averaging, Phase, lookahead_schedule
from lookahead_dist.validation import check_int, check_mixing_alpha, short_repr

__all__ = [
    "GENERATORS",
    "Generator",
    "Param",
    "REQUIRED",
    "complete",
    "edge_matrix",
    "edge_phase",
    "exponential",
    "generator_names",
    "hierarchical",
    "hypercube",
    "metropolis_hastings",
    "one_peer_exponential",
    "ring",
    "star",
    "torus",
    "two_agent",
]

REQUIRED = object()  # marks a parameter without default

#: The most agents a topology may have: 2^19 = 524,288. Every phase is sparse (O(n x degree)), so the limit
#: is set by memory and start-up time: an exponential graph there stores 10.5 million entries (126 MB) and
#: loads in seconds; each doubling costs about twice as much. A larger size is refused up front, naming this
#: limit, before anything of that size is built (10^9 agents would need some 200 GB for the exponential graph).
MAX_AGENTS = 2**19

#: The longest schedule period (sum of the phases' repeats), in steps. 10^9 steps is far beyond any
#: training run, and the bound keeps step arithmetic (k mod period, the phases' start steps) in int64.
MAX_PERIOD = 10**9


def _error(gen: str, key: Optional[str], value, rule: str) -> TopologyError:
    """A TopologyError that remembers which parameter (``key``) was bad, for key paths."""
    where = gen if not key else f"{gen}: {key}" if value is None else f"{gen}: {key} = {short_repr(value)}"
    err = TopologyError(f"{where}: {rule}")
    err.key, err.value, err.rule = key, value, rule
    return err


def _checked(gen: str, key: str, check, value, **kwargs):
    """``check(value, key, **kwargs)`` (a :mod:`lookahead_dist.validation` check), failing as this generator's error."""
    try:
        return check(value, key, **kwargs)
    except ConfigError as exc:
        raise _error(gen, key, value, exc.rule) from None


def _int(gen: str, key: str, value, low: int = 1) -> int:
    if not isinstance(value, numbers.Integral):  # refused here, in few words: the shared check quotes all of it
        raise _error(gen, key, value, f"must be an integer >= {low}")
    return _checked(gen, key, check_int, value, low=low)


def _n(gen: str, n) -> int:
    return _agents(gen, "n", n, _int(gen, "n", n, 1))


def _agents(gen: str, key: str, value, size: int) -> int:
    """``size`` agents, refused above :data:`MAX_AGENTS` before anything of that size is built."""
    if size > MAX_AGENTS:
        raise _error(
            gen,
            key,
            value,
            f"{size} agents exceed the limit MAX_AGENTS = {MAX_AGENTS} (the memory and start-up time of sparse phases)",
        )
    return size


# -- sparse construction ------------------------------------------------------------


def _coo(n: int, rows, cols, vals, shape=None, name: str = "") -> Phase:
    """A phase from (row, col, value) triples (no duplicates), held sparsely."""
    P = sp.coo_array((np.asarray(vals, dtype=np.float64), (np.asarray(rows), np.asarray(cols))), shape=(n, n))
    return Phase(P, 1, name, shape=shape)


def _mh(n: int, u: np.ndarray, v: np.ndarray, shape=None, name: str = "") -> Phase:
    """Metropolis-Hastings weights of the undirected edges {u[k], v[k]} (no self-loops, each edge once).

    The diagonal is 1 - (the column's off-diagonal sum), summed row by row as the dense sum would.
    """
    u, v = np.asarray(u, dtype=np.int64), np.asarray(v, dtype=np.int64)
    deg = np.bincount(np.concatenate([u, v]), minlength=n)
    w = 1.0 / (1.0 + np.maximum(deg[u], deg[v]))
    rows, cols, vals = np.concatenate([u, v]), np.concatenate([v, u]), np.concatenate([w, w])
    order = np.lexsort((rows, cols))
    diag = 1.0 - np.bincount(cols[order], weights=vals[order], minlength=n)
    idx = np.arange(n)
    return _coo(n, np.concatenate([rows, idx]), np.concatenate([cols, idx]), np.concatenate([vals, diag]), shape, name)


def _dense(phase: Phase, gen: str) -> np.ndarray:
    """The dense matrix of a generator's phase, refused above MAX_DENSE_AGENTS."""
    if phase.n > MAX_DENSE_AGENTS:
        raise _error(
            gen,
            "n",
            phase.n,
            f"a dense matrix of {phase.n} agents exceeds the limit MAX_DENSE_AGENTS = {MAX_DENSE_AGENTS}; "
            f"GENERATORS[{gen!r}].phases(n) builds it sparsely",
        )
    return np.array(phase.matrix)


# -- undirected: Metropolis-Hastings ----------------------------------------------


def metropolis_hastings(G: nx.Graph) -> np.ndarray:
    """Metropolis-Hastings weights of an undirected graph.

    With d_i the degree of agent i (self-loops ignored)::

        P[i, j] = 1 / (1 + max(d_i, d_j))      for every edge {i, j}, i != j
        P[i, i] = 1 - sum_{j != i} P[i, j]
        P[i, j] = 0                            otherwise

    P is symmetric and doubly stochastic, so its invariant vector is 1/n.
    Agents are the graph's nodes in sorted order (nodes 0..n-1 map to themselves).
    """
    if G.is_directed():
        raise TopologyError("metropolis_hastings: the graph must be undirected (got a directed graph)")
    nodes = sorted(G.nodes())
    index = {v: i for i, v in enumerate(nodes)}
    n = len(nodes)
    if n == 0:
        raise TopologyError("metropolis_hastings: the graph has no nodes")
    pairs = [(index[u], index[v]) for u, v in G.edges() if u != v]
    u = np.array([p[0] for p in pairs], dtype=np.int64)
    v = np.array([p[1] for p in pairs], dtype=np.int64)
    return _dense(_mh(n, u, v), "metropolis_hastings")


def _ring(n: int) -> list[Phase]:
    n = _n("ring", n)
    i = np.arange(n if n >= 3 else n - 1)
    return [_mh(n, i, (i + 1) % n, (n,), "ring")]


def ring(n: int) -> np.ndarray:
    """Ring (cycle) on n agents, Metropolis-Hastings weights.

    For n >= 3: P[i, i] = P[i, i +- 1 mod n] = 1/3. n = 2 is a single edge
    (every entry 1/2); n = 1 is [[1]]. Consensus rate:
    max_{k != 0} |1/3 + 2/3 cos(2 pi k / n)|.
    """
    return _dense(_ring(n)[0], "ring")


def _torus_sides(rows, cols) -> tuple[int, int]:
    shape = f"shape {rows!r} x {cols!r}"
    rows = _int("torus", "rows", rows, 1)
    cols = _int("torus", "cols", cols, 1)
    for key, side in (("rows", rows), ("cols", cols)):
        if side < 3:
            raise _error("torus", key, side, f"a torus needs both sides >= 3 ({shape})")
    _agents("torus", "rows", rows, rows * cols)
    return rows, cols


def _torus(rows: int, cols: int) -> list[Phase]:
    rows, cols = _torus_sides(rows, cols)
    n = rows * cols
    i = np.arange(n)
    r, c = i // cols, i % cols
    u = np.concatenate([i, i])
    v = np.concatenate([r * cols + (c + 1) % cols, ((r + 1) % rows) * cols + c])
    return [_mh(n, u, v, (rows, cols), "torus")]


def torus(rows: int, cols: int) -> np.ndarray:
    """2-D grid with wrap-around (rows x cols agents, both sides >= 3), Metropolis-Hastings weights.

    Agent r * cols + c sits at (r, c); its neighbours are (r +- 1 mod rows, c) and
    (r, c +- 1 mod cols). Every agent has degree 4, so P[i, j] = 1/5 for each
    neighbour and P[i, i] = 1/5.
    """
    return _dense(_torus(rows, cols)[0], "torus")


def _complete(n: int) -> list[Phase]:
    return [Phase(Averaging(1, _n("complete", n), 1), 1, "complete")]


def complete(n: int) -> np.ndarray:
    """Exact averaging on n agents: P = J / n (every entry 1/n; Metropolis-Hastings on K_n).

    One step maps every agent to the exact average; the consensus rate is 0. Held as one
    :class:`~lookahead_dist.mixing.Averaging` block by the registry: one all-reduce at any n.
    """
    return _dense(_complete(n)[0], "complete")


def _star(n: int) -> list[Phase]:
    n = _n("star", n)
    leaves = np.arange(1, n)
    return [_mh(n, np.zeros(n - 1, dtype=np.int64), leaves, None, "star")]


def star(n: int) -> np.ndarray:
    """Star on n agents with agent 0 the hub, Metropolis-Hastings weights.

    The hub has degree n - 1 and every leaf degree 1, so for n >= 2
    P[0, j] = P[j, 0] = 1/n, P[0, 0] = 1/n and P[j, j] = 1 - 1/n (j >= 1).
    """
    return _dense(_star(n)[0], "star")


def _hypercube(n: int) -> list[Phase]:
    n = _n("hypercube", n)
    if n & (n - 1):
        raise _error("hypercube", "n", n, "a hypercube needs a power of two agents")
    d = n.bit_length() - 1
    i = np.arange(n)
    pairs = [(i[(i >> m) & 1 == 0], i[(i >> m) & 1 == 0] ^ (1 << m)) for m in range(d)]
    u = np.concatenate([p[0] for p in pairs]) if pairs else np.zeros(0, dtype=np.int64)
    v = np.concatenate([p[1] for p in pairs]) if pairs else np.zeros(0, dtype=np.int64)
    return [_mh(n, u, v, (2,) * d if d else None, "hypercube")]


def hypercube(n: int) -> np.ndarray:
    """Hypercube on n = 2^d agents, Metropolis-Hastings weights.

    Agents i and j are neighbours iff their binary indices differ in one bit
    (j = i XOR 2^m); every agent has degree d, so P[i, j] = P[i, i] = 1/(d + 1).
    Circulant for the index shape (2, ..., 2) (XOR is addition there).
    """
    return _dense(_hypercube(n)[0], "hypercube")


# -- directed ---------------------------------------------------------------------


def _exponential(n: int) -> list[Phase]:
    n = _n("exponential", n)
    hops = [1 << m for m in range((n - 1).bit_length())] if n > 1 else []
    w = 1.0 / (len(hops) + 1)
    j = np.arange(n)
    rows = np.concatenate([j] + [(j - s) % n for s in hops])
    cols = np.tile(j, len(hops) + 1)
    return [_coo(n, rows, cols, np.full(rows.size, w), (n,), "exponential")]


def exponential(n: int) -> np.ndarray:
    """Static exponential graph: agent i sends to i + 2^m mod n, m = 0 .. floor(log2(n - 1)).

    With p = floor(log2(n - 1)) + 1 peers, each receiver j gives 1/(p + 1) to itself and
    to each in-neighbour j - 2^m mod n::

        P[j - 2^m mod n, j] = P[j, j] = 1 / (p + 1)

    In- and out-degrees are all p, so P is doubly stochastic (a = 1/n). n = 1 is [[1]].
    """
    return _dense(_exponential(n)[0], "exponential")


def _one_peer_exponential(n: int) -> list[Phase]:
    n = _n("one_peer_exponential", n)
    if n == 1:
        return [Phase(np.ones((1, 1)), 1, "self")]
    j = np.arange(n)
    phases = []
    for m in range((n - 1).bit_length()):
        hop = 1 << m
        rows = np.concatenate([j, (j - hop) % n])
        phases.append(_coo(n, rows, np.tile(j, 2), np.full(2 * n, 0.5), (n,), f"hop {hop}"))
    return phases


def one_peer_exponential(n: int) -> list[Phase]:
    """Time-varying one-peer exponential graph: ceil(log2 n) phases, cycling.

    In phase m (m = 0 .. ceil(log2 n) - 1) agent i sends to i + 2^m mod n only, and
    every agent averages itself with the one it hears from::

        P_m[j - 2^m mod n, j] = P_m[j, j] = 1/2

    Each P_m is doubly stochastic. When n is a power of two the product of the
    phases is exactly J / n: every agent holds the average after log2(n) steps.
    n = 1 is a single phase [[1]]. The phases are held sparsely (``Phase.matrix``
    densifies one on demand).
    """
    return _one_peer_exponential(n)


def two_agent(alpha: float = 0.5, tau: int = 5) -> list[Phase]:
    """Serial Lookahead (paper eq. 5): fast agent 0 (x), slow agent 1 (z).

    P_k = I for tau - 1 steps, then a 1^T with a = [alpha, 1 - alpha]^T: both
    agents take alpha x + (1 - alpha) z. alpha = 1 is valid (its only edge is
    fast -> slow, rate 0).
    """
    alpha = _checked("two_agent", "alpha", check_mixing_alpha, alpha)
    tau = _int("two_agent", "tau", tau, 1)
    if tau > MAX_PERIOD:
        raise _error("two_agent", "tau", tau, f"exceeds the longest period MAX_PERIOD = {MAX_PERIOD} steps")
    try:
        return list(lookahead_schedule(float(alpha), tau).phases)
    except MixingError as exc:  # pragma: no cover - arguments are checked above
        raise _error("two_agent", None, None, str(exc)) from None


STATIC_INTER = ("ring", "complete", "star", "hypercube", "exponential")


def hierarchical(nodes: int, per_node: int, inter: str = "ring") -> list[Phase]:
    """Two-level mixing on nodes x per_node agents (agent index = node * per_node + local index).

    Two phases:

    1. intra-node exact averaging, kron(I_nodes, J_per_node / per_node) (an
       :class:`~lookahead_dist.mixing.Averaging` block: one all-reduce per node);
    2. inter-node gossip, kron(W, I_per_node), with W = ``inter``(nodes) a static
       built-in generator: agent a of node u mixes with agent a of u's neighbours.

    Their product is kron(W, J_per_node / per_node). Both phases are circulant for the
    index shape (nodes, per_node) when W is circulant (ring, exponential, complete).
    """
    nodes = _int("hierarchical", "nodes", nodes, 1)
    per_node = _int("hierarchical", "per_node", per_node, 1)
    _agents("hierarchical", "nodes", nodes, nodes * per_node)
    if inter not in STATIC_INTER:
        raise _error("hierarchical", "inter", inter, f"must be one of {list(STATIC_INTER)}")
    try:
        (W,) = GENERATORS[inter].build(nodes)
    except TopologyError as exc:
        raise _error("hierarchical", "inter", inter, f"{inter} on {nodes} nodes: {exc}") from None
    shape = (nodes, per_node)
    intra = Phase(Averaging(nodes, per_node, 1), 1, "intra-node average", shape=shape)
    if W.averaging is not None:
        across = Averaging(1, nodes, per_node)
    else:
        across = sp.kron(W.csc, sp.identity(per_node, format="csc"), format="csc")
    return [intra, Phase(across, 1, f"inter-node {inter}", shape=shape)]


def edge_phase(n: int, edges, push_sum: bool = False, undirected: bool = False) -> Phase:
    """The mixing matrix of a directed edge list on n agents, held sparsely: (i, j) or (i, j, w) each.

    Column-stochastic rule: edge (i -> j, w) means agent j takes weight w from agent i::

        P[i, j] = w,   P[j, j] = 1 - sum_{i != j} P[i, j]   (an error if negative)

    Without weights (all edges weighted, or none), receiver j gives
    1/(in_degree(j) + 1) to itself and to each in-neighbour. A self-loop
    (j, j, w) sets P[j, j] = w instead (column j must then sum to 1 on its own).
    ``push_sum``: edge (i -> j, w) means i sends the fraction w of its mass to j,
    P[i, j] = w and P[i, i] = 1 - sum_{j != i} P[i, j] (rows sum to 1; without
    weights 1/(out_degree(i) + 1) each). ``undirected``: every edge also goes j -> i.
    O(edges + n) time and memory.
    """
    _agents("edges", "n", n, n)
    edges = [tuple(e) for e in edges]
    if undirected:
        edges += [(e[1], e[0]) + e[2:] for e in edges if e[0] != e[1]]
    weighted = bool(edges) and len(edges[0]) == 3
    seen = set()
    src, dst, wts, fixed = [], [], [], {}  # built receiver-major: column dst = what dst takes
    for e in edges:
        i, j = e[0], e[1]
        if (i, j) in seen:
            raise _error(
                "edges",
                None,
                None,
                f"duplicate edge {i} -> {j}" + (" (undirected: true adds every reverse edge)" if undirected else ""),
            )
        seen.add((i, j))
        s, d = (j, i) if push_sum else (i, j)
        if s == d:
            if weighted:
                fixed[d] = e[2]
            continue
        src.append(s)
        dst.append(d)
        wts.append(float(e[2]) if weighted else 1.0)
    src, dst, wts = np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64), np.array(wts, dtype=np.float64)
    if weighted:
        keep = wts != 0.0
        src, dst, wts = src[keep], dst[keep], wts[keep]
    order = np.lexsort((src, dst))
    src, dst, wts = src[order], dst[order], wts[order]
    free = np.ones(n, dtype=bool)
    free[list(fixed)] = False
    if not weighted:
        indeg = np.bincount(dst, minlength=n)
        w = 1.0 / (indeg + 1.0)
        wts = w[dst]
        diag = w
    else:
        sums = np.bincount(dst, weights=wts, minlength=n)
        if n <= DENSE_FINGERPRINT_AGENTS:  # summed as a dense column is (pairwise), so small weights stay bit for bit
            D = np.zeros((n, n))
            D[src, dst] = wts
            for j in np.unique(dst).tolist():
                sums[j] = D[:, j].sum()
        over = np.flatnonzero(free & (sums > 1 + 1e-9))
        if over.size:
            j = int(over[0])
            word = "row" if push_sum else "column"
            raise _error(
                "edges",
                None,
                None,
                f"{word} {j}: the weights of agent {j} sum to {float(sums[j])!r} > 1, "
                "so its self-weight 1 - sum would be negative",
            )
        diag = np.maximum(0.0, 1.0 - sums)
        for j, x in fixed.items():
            diag[j] = x
    idx = np.arange(n)
    rows, cols = np.concatenate([src, idx]), np.concatenate([dst, idx])
    vals = np.concatenate([wts, diag])
    if push_sum:
        rows, cols = cols, rows
    return _coo(n, rows, cols, vals)


def edge_matrix(n: int, edges, push_sum: bool = False, undirected: bool = False) -> np.ndarray:
    """:func:`edge_phase` as a dense matrix (up to MAX_DENSE_AGENTS agents)."""
    return _dense(edge_phase(n, edges, push_sum, undirected), "edges")


# -- registry ---------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One parameter of a generator: its name, type (int, float or str) and default."""

    name: str
    kind: type
    default: object = REQUIRED

    def check(self, gen: str, value):
        if self.kind is int:
            return _int(gen, self.name, value, 1)
        if self.kind is float:
            try:  # float() first: math.isfinite(10**400) raises OverflowError
                finite = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(float(value))
            except OverflowError:
                finite = False
            if not finite:
                raise _error(gen, self.name, value, "must be a finite number")
            return float(value)
        if not isinstance(value, str):
            raise _error(gen, self.name, value, "must be a string")
        return value

    def __str__(self) -> str:
        text = f"{self.name}: {self.kind.__name__}"
        return text if self.default is REQUIRED else f"{text} = {self.default!r}"


def _fill_n(gen: str, params: dict, n: Optional[int]) -> dict:
    if "n" not in params:
        if n is None:
            raise _error(gen, "n", None, "the number of agents is unknown: give agents, n or a world size")
        params["n"] = n
    elif n is not None and params["n"] != n:
        raise _error(gen, "n", params["n"], f"does not match the {n} agents of the topology")
    return params


def _fill_pair(gen: str, a: str, b: str, params: dict, n: Optional[int], pick) -> dict:
    """Fill the two factors a * b = n of a two-level shape from n, or check them against it."""
    have_a, have_b = a in params, b in params
    if have_a and have_b:
        x, y = params[a], params[b]
        if n is not None and isinstance(x, int) and isinstance(y, int) and x * y != n:
            raise _error(gen, a, x, f"{a} * {b} = {x} * {y} = {x * y} does not match the {n} agents")
        return params
    if n is None:
        raise _error(
            gen,
            a if not have_a else b,
            None,
            f"the number of agents is unknown: give both {a} and {b}, agents, or a world size",
        )
    if not have_a and not have_b:
        params[a], params[b] = pick(n)
        return params
    given, other = (a, b) if have_a else (b, a)
    x = _int(gen, given, params[given], 1)
    if n % x:
        raise _error(gen, given, x, f"does not divide the {n} agents")
    params[other] = n // x
    return params


def _torus_shape(n: int) -> tuple[int, int]:
    rows = max((r for r in range(3, math.isqrt(n) + 1) if n % r == 0 and n // r >= 3), default=None)
    if rows is None:
        raise _error("torus", "rows", None, f"{n} agents cannot form a torus with both sides >= 3; give rows and cols")
    return rows, n // rows


def _hier_shape(n: int):
    raise _error("hierarchical", "nodes", None, f"give nodes or per_node (the {n} agents do not fix the split)")


def _fill_two(params: dict, n: Optional[int]) -> dict:
    if n is not None and n != 2:
        raise _error("two_agent", None, None, f"Lookahead has exactly 2 agents (fast 0, slow 1), not {n}")
    return params


@dataclass(frozen=True)
class Generator:
    """A registered generator: call it uniformly with :meth:`phases`.

    ``static`` generators return one matrix, the others a list of phases.
    ``roles`` gives default agent roles ("fast"/"slow"), or None for all fast.
    ``func`` is the public function (dense matrices); ``build`` takes the same
    arguments and returns the phases held sparsely, which :meth:`phases` uses.
    """

    name: str
    func: Callable
    params: tuple
    static: bool
    fill: Callable[[dict, Optional[int]], dict]
    roles: Optional[tuple] = None
    summary: str = field(default="", compare=False)
    build: Optional[Callable] = field(default=None, compare=False)

    def signature(self) -> str:
        return f"{self.name}({', '.join(str(p) for p in self.params)})"

    def phases(self, n: Optional[int] = None, /, **params) -> list[Phase]:
        """Build the generator's phases from keyword ``params``; ``n`` fills or checks its size.

        Raises :class:`TopologyError` (with attribute ``key``: the bad parameter, or None).
        """
        known = {p.name: p for p in self.params}
        for key in params:
            if key not in known:
                raise _error(self.name, key, params[key], f"unknown parameter; {self.name} takes {self.signature()}")
        params = self.fill(dict(params), n)
        args = {}
        for p in self.params:
            if p.name in params:
                args[p.name] = p.check(self.name, params[p.name])
            elif p.default is REQUIRED:
                raise _error(self.name, p.name, None, f"missing required parameter of {self.signature()}")
        out = (self.build or self.func)(**args)
        phases = [Phase(out, 1, self.name)] if isinstance(out, np.ndarray) else list(out)
        size = phases[0].n
        if n is not None and size != n:
            raise _error(self.name, None, None, f"gives {size} agents, not {n}")
        return phases


def _reg(name, func, params, static, fill, roles=None) -> Generator:
    build = globals().get(f"_{name}")
    return Generator(name, func, tuple(params), static, fill, roles, (func.__doc__ or "").split("\n")[0], build)


_N = (Param("n", int),)
GENERATORS: dict[str, Generator] = {
    g.name: g
    for g in (
        _reg("ring", ring, _N, True, lambda p, n: _fill_n("ring", p, n)),
        _reg(
            "torus",
            torus,
            (Param("rows", int), Param("cols", int)),
            True,
            lambda p, n: _fill_pair("torus", "rows", "cols", p, n, _torus_shape),
        ),
        _reg("complete", complete, _N, True, lambda p, n: _fill_n("complete", p, n)),
        _reg("star", star, _N, True, lambda p, n: _fill_n("star", p, n)),
        _reg("hypercube", hypercube, _N, True, lambda p, n: _fill_n("hypercube", p, n)),
        _reg("exponential", exponential, _N, True, lambda p, n: _fill_n("exponential", p, n)),
        _reg(
            "one_peer_exponential", one_peer_exponential, _N, False, lambda p, n: _fill_n("one_peer_exponential", p, n)
        ),
        _reg(
            "two_agent",
            two_agent,
            (Param("alpha", float, 0.5), Param("tau", int, 5)),
            False,
            _fill_two,
            roles=("fast", "slow"),
        ),
        _reg(
            "hierarchical",
            hierarchical,
            (Param("nodes", int), Param("per_node", int), Param("inter", str, "ring")),
            False,
            lambda p, n: _fill_pair("hierarchical", "nodes", "per_node", p, n, _hier_shape),
        ),
    )
}


def generator_names() -> list[str]:
    """The names of the built-in generators, sorted."""
    return sorted(GENERATORS)
