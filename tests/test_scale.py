"""Sparse schedules at scale: the sparse forms, plans and numbers against dense oracles, limits, 65,536 ranks.

The dense oracles here are written out in this file (the plan compiler as it walked the whole dense
matrix, the dense fingerprint, dense eigenvalues), so the sparse code is checked against an
independent computation, not against itself.
"""

import hashlib
import math

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lookahead_dist import generators as gen
from lookahead_dist import mixing, topology
from lookahead_dist.errors import MixingError, TopologyError
from lookahead_dist.mixing import Averaging, Phase, Schedule, circulant_spectrum, consensus_rate
from lookahead_dist.plan import (
    AllReduce,
    Exchange,
    LocalCombine,
    Plan,
    compile_plan,
    group_rank_sets,
    send_peer_counts,
)
from lookahead_dist.topology import builtin, from_mapping
from lookahead_dist.topology_cli import report

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- the dense plan compiler, as it walked the whole matrix ----------------------------------------------


def dense_components(P):
    n = P.shape[0]
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(P)):
        ri, rj = find(int(i)), find(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return [groups[r] for r in sorted(groups)]


def dense_plan(P, placement, rank):
    """compile_plan by dense column and row scans over every component (the former algorithm)."""

    def weights(j):
        src = sorted(np.flatnonzero(P[:, j]).tolist(), key=lambda i: (i != j, i))
        return tuple((i, float(P[i, j])) for i in src)

    allreduces, ex_comb, local_comb, sends, recvs, groups = [], [], [], {}, {}, []
    for comp in dense_components(P):
        if np.array_equal(P[np.ix_(comp, comp)], np.eye(len(comp))):
            continue
        ranks = tuple(sorted({placement[i] for i in comp}))
        mine = [i for i in comp if placement[i] == rank]
        if len(ranks) == 1:
            local_comb += [(j, weights(j)) for j in mine]
        elif all(np.array_equal(P[:, j], P[:, comp[0]]) for j in comp):
            groups.append(ranks)
            if mine:
                first = P[:, comp[0]]
                coeffs = tuple((i, float(first[i])) for i in mine if first[i] != 0.0)
                allreduces.append(AllReduce(ranks, coeffs, tuple(mine)))
        else:
            for j in mine:
                w = weights(j)
                ex_comb.append((j, w))
                for i, _ in w:
                    if placement[i] != rank and i not in recvs.setdefault(placement[i], []):
                        recvs[placement[i]].append(i)
            for i in mine:
                for j in np.flatnonzero(P[i, :]).tolist():
                    if placement[j] != rank and i not in sends.setdefault(placement[j], []):
                        sends[placement[j]].append(i)
    exchange = None
    if ex_comb or any(sends.values()):
        exchange = Exchange(
            tuple((r, tuple(sorted(a))) for r, a in sorted(sends.items()) if a),
            tuple((r, tuple(sorted(a))) for r, a in sorted(recvs.items()) if a),
            tuple(ex_comb),
        )
    local = LocalCombine(tuple(local_comb)) if local_comb else None
    return Plan(rank, tuple(allreduces), exchange, local), groups


@st.composite
def matrix_and_placement(draw):
    """A random sparse column-stochastic matrix with some equal-column blocks, and a random placement."""
    n = draw(st.integers(1, 9))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    P = np.zeros((n, n))
    perm = rng.permutation(n)
    k = 0
    while k < n:
        size = int(rng.integers(1, n - k + 1))
        block = perm[k : k + size]
        kind = rng.integers(0, 3)
        if kind == 0:  # an all-reduce block c 1^T (some c_i zero)
            c = rng.random(size) * (rng.random(size) < 0.7)
            c[0] += 0.1
            P[np.ix_(block, block)] = np.outer(c / c.sum(), np.ones(size))
        elif kind == 1:  # gossip inside the block
            W = rng.random((size, size)) * (rng.random((size, size)) < 0.5) + np.eye(size)
            P[np.ix_(block, block)] = W / W.sum(axis=0)
        else:  # identity
            P[block, block] = 1.0
        k += size
    world = int(rng.integers(1, n + 1))
    placement = tuple(int(r) for r in rng.integers(0, world, n))
    return P, placement


@SETTINGS
@given(matrix_and_placement())
def test_plans_and_groups_equal_the_dense_compiler(case):
    P, placement = case
    for form in (P, Phase(sp.csc_array(P))):
        for rank in range(max(placement) + 2):  # and one rank that hosts nothing
            want, groups = dense_plan(P, placement, rank)
            assert compile_plan(form, placement, rank) == want
        assert group_rank_sets(form, placement) == groups


@SETTINGS
@given(matrix_and_placement())
def test_send_peer_counts_equal_every_plan(case):
    P, placement = case
    counts = send_peer_counts(P, placement).tolist()
    assert counts == [len(compile_plan(P, placement, r).send_peers()) for r in range(max(placement) + 1)]


# -- numbers against the dense computations --------------------------------------------------------------


def dense_rate(phases, push_sum=False):
    Pi = np.eye(phases[0].n)
    for ph in phases:
        Pi = Pi @ np.linalg.matrix_power(ph.matrix, ph.repeat)
    return consensus_rate(Pi.T if push_sum else Pi)


BUILTINS = [
    ("ring", {"n": 12}),
    ("ring", {"n": 2}),
    ("torus", {"rows": 3, "cols": 5}),
    ("exponential", {"n": 11}),
    ("one_peer_exponential", {"n": 6}),
    ("one_peer_exponential", {"n": 16}),
    ("hypercube", {"n": 16}),
    ("star", {"n": 7}),
    ("complete", {"n": 9}),
    ("hierarchical", {"nodes": 5, "per_node": 3, "inter": "ring"}),
    ("hierarchical", {"nodes": 4, "per_node": 2, "inter": "exponential"}),
    ("hierarchical", {"nodes": 4, "per_node": 3, "inter": "complete"}),
    ("hierarchical", {"nodes": 4, "per_node": 2, "inter": "hypercube"}),
    ("hierarchical", {"nodes": 3, "per_node": 2, "inter": "star"}),
]


@pytest.mark.parametrize("name, params", BUILTINS)
def test_builtin_rates_and_invariant_vectors_equal_the_dense_ones(name, params):
    phases = gen.GENERATORS[name].phases(None, **params)
    s = Schedule(phases)
    assert s.consensus_rate() == pytest.approx(dense_rate(s.phases), abs=1e-12)
    np.testing.assert_allclose(mixing._sparse_invariant(list(s.phases), 1e-9), np.full(s.n, 1 / s.n), atol=1e-15)
    if name not in ("star",) and not (name == "hierarchical" and params["inter"] in ("hypercube", "star")):
        assert mixing._circulant_rate(s.phases) is not None  # the closed form, not a fallback


def test_circulant_check_rejects_a_matrix_that_is_not():
    P = gen.ring(6).copy()
    P[0, 0], P[1, 0] = P[0, 0] + 0.1, P[1, 0] - 0.1  # column 0 no longer a shift of the others
    assert circulant_spectrum(Phase(P), (6,)) is None
    assert circulant_spectrum(Phase(gen.torus(3, 4)), (12,)) is None  # circulant for (3, 4), not for (12,)
    assert circulant_spectrum(Phase(gen.torus(3, 4)), (3, 4)) is not None


def random_stochastic(n, rng, density=0.05, push_sum=False):
    W = sp.random(n, n, density=density, random_state=rng, format="csc") + sp.identity(n, format="csc")
    W = sp.csc_array(W)
    sums = W.sum(axis=1 if push_sum else 0)
    return W @ sp.diags(1 / sums) if not push_sum else sp.diags(1 / sums) @ W


@pytest.mark.parametrize("push_sum", [False, True])
def test_iterative_rate_and_sparse_invariant_vector_equal_the_dense_ones(push_sum):
    rng = np.random.default_rng(3)
    n = 120
    phases = [Phase(random_stochastic(n, rng, density=0.1, push_sum=push_sum), r) for r in (1, 2)]
    s = Schedule(phases, push_sum=push_sum)
    assert mixing._iterative_rate(s) == pytest.approx(dense_rate(s.phases, push_sum), abs=1e-9)
    if not push_sum:
        one = Schedule(phases[:1])
        dense_a = mixing._dense_invariant([one.phases[0].matrix], 1e-9)
        np.testing.assert_allclose(mixing._sparse_invariant(list(one.phases), 1e-9), dense_a, atol=1e-12)


def test_large_schedules_use_the_sparse_methods_and_agree_with_dense(monkeypatch):
    monkeypatch.setattr(mixing, "DENSE_SPECTRAL_AGENTS", 64)  # the sparse methods from 65 agents on
    n = 150
    star = builtin("star", world_size=n).schedule  # not circulant: ARPACK on the sparse products
    dense = consensus_rate(star.phases[0].matrix)
    assert star.consensus_rate() == pytest.approx(dense, abs=1e-9)
    rng = np.random.default_rng(5)
    far = {(i, int(j)) for i in range(n) for j in rng.choice(n, 2, replace=False) if j not in (i, (i + 1) % n)}
    weighted = [[i, (i + 1) % n, 0.3] for i in range(n)] + [[i, j, 0.1] for i, j in sorted(far)]
    t = from_mapping({"nodes": n, "edges": weighted})
    # directed and not doubly stochastic: the invariant vector by a sparse solve, the rate by ARPACK
    a = t.schedule.invariant_vector()
    P = t.schedule.phases[0].matrix
    np.testing.assert_allclose(P @ a, a, atol=1e-12)
    np.testing.assert_allclose(a, mixing._dense_invariant([P], 1e-9), atol=1e-12)
    assert t.schedule.consensus_rate() == pytest.approx(consensus_rate(P), abs=1e-9)


def test_not_unique_and_no_common_vector_are_found_sparsely(monkeypatch):
    monkeypatch.setattr(mixing, "DENSE_SPECTRAL_AGENTS", 64)
    n = 80
    halves = sp.block_diag([gen.GENERATORS["ring"].phases(n // 2)[0].csc] * 2, format="csc")
    with pytest.raises(MixingError, match="not unique: the agents split into 2 groups"):
        Schedule([halves]).invariant_vector()
    assert Schedule([halves]).consensus_rate() == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(MixingError, match="not unique"):
        mixing._sparse_invariant([Phase(sp.identity(n, format="csc"))], 1e-9)


# -- averaging blocks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("abc", [(1, 6, 1), (3, 2, 1), (1, 3, 2), (2, 2, 2), (4, 1, 1)])
def test_averaging_block_is_the_kronecker_product(abc):
    a, b, c = abc
    want = np.kron(np.kron(np.eye(a), np.full((b, b), 1 / b)), np.eye(c))
    ph = Phase(Averaging(a, b, c))
    np.testing.assert_array_equal(ph.matrix, want)
    v = np.random.default_rng(0).normal(size=a * b * c)
    np.testing.assert_allclose(ph.matvec(v), want @ v, atol=1e-15)
    for j in range(a * b * c):
        src, w = ph.column(j)
        np.testing.assert_array_equal(src, np.flatnonzero(want[:, j]))
    assert ph.is_identity == (b == 1)
    for s in range(a * b * c):
        assert ph.shift_invariant(s) == np.array_equal(np.roll(want, (s, s), axis=(0, 1)), want)


# -- fingerprints ----------------------------------------------------------------------------------------


def dense_fingerprint(s):
    h = hashlib.sha256()
    h.update(f"n={s.n};push_sum={s.push_sum};".encode())
    for ph in s.phases:
        h.update(f"repeat={ph.repeat};".encode())
        h.update(np.ascontiguousarray(ph.matrix, dtype="<f8").tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("name, n", [("one_peer_exponential", 300), ("complete", 20), ("hierarchical", 12)])
def test_fingerprint_up_to_2048_agents_is_the_dense_one(name, n):
    s = builtin(name, world_size=n, **({"per_node": 3} if name == "hierarchical" else {})).schedule
    assert s.fingerprint() == dense_fingerprint(s)


def test_large_fingerprints_differ_when_a_weight_or_repeat_does():
    n = mixing.DENSE_FINGERPRINT_AGENTS + 4
    ring = gen.GENERATORS["ring"].phases(n)[0]
    base = Schedule([ring]).fingerprint()
    assert Schedule(gen.GENERATORS["ring"].phases(n)).fingerprint() == base
    C = ring.csc.copy()
    C.data[0] += 1e-12
    C.data[1] -= 1e-12
    assert Schedule([Phase(C)]).fingerprint() != base
    assert Schedule([Phase(ring, 2)]).fingerprint() != base
    complete = gen.GENERATORS["complete"].phases(n)
    assert Schedule(complete).fingerprint() != Schedule(gen.GENERATORS["complete"].phases(n + 1)).fingerprint()


# -- limits ----------------------------------------------------------------------------------------------


def test_dense_forms_are_refused_above_their_limit():
    n = mixing.MAX_DENSE_AGENTS + 1
    ph = gen.GENERATORS["ring"].phases(n)[0]
    with pytest.raises(MixingError, match=f"{n} agents .* exceeds the limit MAX_DENSE_AGENTS = 4096"):
        _ = ph.matrix
    with pytest.raises(TopologyError, match=f"n = {n}: a dense matrix of {n} agents exceeds the limit MAX_DENSE"):
        gen.ring(n)
    with pytest.raises(MixingError, match="MAX_NONZEROS"):
        _ = Phase(Averaging(1, 2**14, 1)).csc  # 2^28 entries as a sparse matrix
    out = None
    try:
        from_mapping({"matrix": [[1.0] * 2049] * 2049})
    except TopologyError as exc:
        out = str(exc)
    assert "2049 rows" in out and "MAX_MATRIX_AGENTS = 2048" in out


def test_sizes_beyond_max_agents_are_refused_up_front_and_200000_loads():
    with pytest.raises(TopologyError, match=f"{gen.MAX_AGENTS + 1} agents exceed the limit MAX_AGENTS = 524288"):
        builtin("exponential", n=gen.MAX_AGENTS + 1)
    t = builtin("ring", world_size=200_000)  # 298 GiB dense: refused with MemoryError before
    assert t.n == 200_000 and 1 - t.schedule.consensus_rate() == pytest.approx(
        2 / 3 * (1 - math.cos(2 * math.pi / t.n))
    )


def test_a_schedule_of_too_many_stored_entries_is_refused(monkeypatch):
    monkeypatch.setattr(topology, "MAX_SCHEDULE_NONZEROS", 1000)
    with pytest.raises(TopologyError, match=r"schedule\[1\]: the phases so far store 1200 entries, beyond the limit"):
        from_mapping({"schedule": [{"generator": "ring"}, {"generator": "ring"}], "agents": 200})


# -- 65,536 ranks ----------------------------------------------------------------------------------------


def test_complete_at_65536_is_one_all_reduce_with_a_plan_of_one_coefficient():
    t = builtin("complete", world_size=65536)
    (ph,) = t.schedule.phases
    assert ph.averaging is not None and t.schedule.consensus_rate() == 0.0
    assert group_rank_sets(ph, t.placement) == [tuple(range(65536))]
    plan = compile_plan(ph, t.placement, 12345)
    assert plan.exchange is None and plan.local is None and len(plan.allreduces) == 1
    (ar,) = plan.allreduces
    assert ar.coeffs == ((12345, 1 / 65536),) and ar.receivers == (12345,) and len(ar.ranks) == 65536


def test_one_peer_exponential_at_65536_plans_each_rank_from_its_own_rows():
    t = builtin("one_peer_exponential", world_size=65536)
    plans = [compile_plan(ph, t.placement, 7) for ph in t.schedule.phases]  # times: bench/scale.py
    assert t.schedule.consensus_rate() == pytest.approx(0.0, abs=1e-12)
    *gossip, last = plans
    assert last.exchange is None and last.allreduces[0].ranks == (7, 7 + 32768)  # equal columns: an all-reduce
    for m, plan in enumerate(gossip):
        hop = 1 << m
        assert plan.exchange.sends == (((7 + hop) % 65536, (7,)),)
        assert plan.exchange.recvs == (((7 - hop) % 65536, ((7 - hop) % 65536,)),)
        assert plan.exchange.combine == ((7, ((7, 0.5), ((7 - hop) % 65536, 0.5))),)


def test_hierarchical_at_65536_groups_each_node_and_reports():
    t = builtin("hierarchical", world_size=65536, per_node=8)
    groups = group_rank_sets(t.schedule.phases[0], t.placement)
    assert len(groups) == 8192 and groups[5] == tuple(range(40, 48))
    text = report(t)
    assert "one all-reduce over ranks [0, 1, 2, 3, 4, 5, 6, 7]" in text and "8176 more all-reduces" in text
    assert "messages per step (distinct other ranks each rank sends to): every rank: 2" in text


def test_phases_are_immutable_and_survive_pickling():
    import pickle

    t = builtin("hierarchical", world_size=12, per_node=3)
    back = pickle.loads(pickle.dumps(t))
    assert back.fingerprint() == t.fingerprint() and back.schedule.consensus_rate() == t.schedule.consensus_rate()
    with pytest.raises(AttributeError, match="immutable"):
        t.schedule.phases[0].repeat = 2
