"""compile_plan: the exact sends, receives and all-reduces each rank gets, written out by hand.

Each expected plan below is derived from the matrix on paper (column j = the
weights agent j takes, P[i, j] != 0 means agent i's buffer reaches agent j),
not by calling the compiler. Weights are compared after rounding to 12 digits:
Metropolis-Hastings diagonals such as 1 - 2/3 are not exactly 1/3.
"""

from dataclasses import fields, is_dataclass
from pathlib import Path

import numpy as np
import pytest

from lookahead_dist.plan import AllReduce, Exchange, LocalCombine, Plan, compile_plan, components, group_rank_sets
from lookahead_dist.topology import builtin, load

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"
T = 1.0 / 3.0


def norm(obj):
    """A plan as nested tuples with every float rounded, so that 1 - 2/3 == 1/3."""
    if is_dataclass(obj):
        return (type(obj).__name__,) + tuple(norm(getattr(obj, f.name)) for f in fields(obj))
    if isinstance(obj, (tuple, list)):
        return tuple(norm(x) for x in obj)
    if isinstance(obj, float):
        return round(obj, 12)
    return obj


def assert_plans(P, placement, expected: dict):
    """compile_plan(P, placement, r) equals expected[r] for every rank r (ranks absent from expected: no-op)."""
    world = max(placement) + 1
    for r in range(world):
        got = compile_plan(P, placement, r)
        want = expected.get(r, Plan(r))
        assert norm(got) == norm(want), f"rank {r}:\n got  {got}\n want {want}"


def only_matrix(t, k=0):
    return np.array(t.schedule.phases[k].matrix)


# -- ring -----------------------------------------------------------------------------


def test_ring_of_four_exchanges_with_both_neighbours():
    P = only_matrix(builtin("ring", world_size=4))
    want_P = np.array([[T, T, 0, T], [T, T, T, 0], [0, T, T, T], [T, 0, T, T]])
    np.testing.assert_allclose(P, want_P, rtol=0, atol=1e-15)
    expected = {}
    for r in range(4):
        left, right = (r - 1) % 4, (r + 1) % 4
        lo, hi = sorted((left, right))
        expected[r] = Plan(
            r,
            exchange=Exchange(
                sends=((lo, (r,)), (hi, (r,))),
                recvs=((lo, (lo,)), (hi, (hi,))),
                combine=((r, ((r, T), (lo, T), (hi, T))),),
            ),
        )
    assert_plans(P, (0, 1, 2, 3), expected)
    assert group_rank_sets(P, (0, 1, 2, 3)) == []
    plan0 = compile_plan(P, (0, 1, 2, 3), 0)
    assert plan0.send_peers() == (1, 3) and plan0.messages() == 2 and plan0.bytes_sent(100) == 200
    assert not plan0.is_noop


def test_ring_of_four_on_two_ranks_sends_only_the_boundary_agents():
    """Agents 0, 1 on rank 0 and 2, 3 on rank 1: agent 1 talks to 2, agent 0 to 3 (across the wrap)."""
    P = only_matrix(builtin("ring", world_size=4))
    expected = {
        0: Plan(
            0,
            exchange=Exchange(
                sends=((1, (0, 1)),),
                recvs=((1, (2, 3)),),
                combine=((0, ((0, T), (1, T), (3, T))), (1, ((1, T), (0, T), (2, T)))),
            ),
        ),
        1: Plan(
            1,
            exchange=Exchange(
                sends=((0, (2, 3)),),
                recvs=((0, (0, 1)),),
                combine=((2, ((2, T), (1, T), (3, T))), (3, ((3, T), (0, T), (2, T)))),
            ),
        ),
    }
    assert_plans(P, (0, 0, 1, 1), expected)


# -- complete and star ------------------------------------------------------------------


def test_complete_graph_is_one_all_reduce_over_every_rank():
    P = only_matrix(builtin("complete", world_size=4))
    assert np.array_equal(P, np.full((4, 4), 0.25))
    expected = {r: Plan(r, allreduces=(AllReduce((0, 1, 2, 3), ((r, 0.25),), (r,)),)) for r in range(4)}
    assert_plans(P, (0, 1, 2, 3), expected)
    assert group_rank_sets(P, (0, 1, 2, 3)) == [(0, 1, 2, 3)]
    plan = compile_plan(P, (0, 1, 2, 3), 2)
    assert plan.messages() == 1 and plan.send_peers() == ()
    assert plan.bytes_sent(400) == 2 * 3 * 400 // 4  # a ring all-reduce over 4 ranks: 2 (p - 1) / p buffers


def test_complete_graph_with_two_agents_per_rank_sums_both_into_one_all_reduce():
    P = np.full((4, 4), 0.25)
    expected = {
        0: Plan(0, allreduces=(AllReduce((0, 1), ((0, 0.25), (1, 0.25)), (0, 1)),)),
        1: Plan(1, allreduces=(AllReduce((0, 1), ((2, 0.25), (3, 0.25)), (2, 3)),)),
    }
    assert_plans(P, (0, 0, 1, 1), expected)


def test_star_hub_exchanges_with_every_leaf_and_each_leaf_only_with_the_hub():
    """Metropolis-Hastings on a star of 4: hub degree 3, so every hub weight is 1/4 and a leaf keeps 3/4."""
    P = only_matrix(builtin("star", world_size=4))
    q = 0.25
    np.testing.assert_allclose(P, [[q, q, q, q], [q, 0.75, 0, 0], [q, 0, 0.75, 0], [q, 0, 0, 0.75]], atol=1e-15)
    expected = {
        0: Plan(
            0,
            exchange=Exchange(
                sends=((1, (0,)), (2, (0,)), (3, (0,))),
                recvs=((1, (1,)), (2, (2,)), (3, (3,))),
                combine=((0, ((0, q), (1, q), (2, q), (3, q))),),
            ),
        )
    }
    for leaf in (1, 2, 3):
        expected[leaf] = Plan(
            leaf,
            exchange=Exchange(sends=((0, (leaf,)),), recvs=((0, (0,)),), combine=((leaf, ((leaf, 0.75), (0, q))),)),
        )
    assert_plans(P, (0, 1, 2, 3), expected)
    assert compile_plan(P, (0, 1, 2, 3), 0).messages() == 3
    assert compile_plan(P, (0, 1, 2, 3), 3).messages() == 1


# -- hierarchical 2 x 2 -------------------------------------------------------------------


def hierarchical_2x2():
    t = builtin("hierarchical", nodes=2, per_node=2)
    assert len(t.schedule.phases) == 2 and t.placement == (0, 1, 2, 3)
    intra, inter = only_matrix(t, 0), only_matrix(t, 1)
    h = 0.5
    assert np.array_equal(intra, [[h, h, 0, 0], [h, h, 0, 0], [0, 0, h, h], [0, 0, h, h]])
    assert np.array_equal(inter, [[h, 0, h, 0], [0, h, 0, h], [h, 0, h, 0], [0, h, 0, h]])
    return intra, inter


def test_hierarchical_2x2_one_agent_per_rank_is_two_pairs_of_all_reduces():
    intra, inter = hierarchical_2x2()
    # intra-node average: {0, 1} and {2, 3}
    assert group_rank_sets(intra, (0, 1, 2, 3)) == [(0, 1), (2, 3)]
    assert_plans(
        intra,
        (0, 1, 2, 3),
        {r: Plan(r, allreduces=(AllReduce((0, 1) if r < 2 else (2, 3), ((r, 0.5),), (r,)),)) for r in range(4)},
    )
    # inter-node ring on 2 nodes (a single edge): agent a of node 0 with agent a of node 1, {0, 2} and {1, 3}
    assert group_rank_sets(inter, (0, 1, 2, 3)) == [(0, 2), (1, 3)]
    assert_plans(
        inter,
        (0, 1, 2, 3),
        {r: Plan(r, allreduces=(AllReduce((0, 2) if r % 2 == 0 else (1, 3), ((r, 0.5),), (r,)),)) for r in range(4)},
    )


def test_hierarchical_2x2_one_node_per_rank_averages_locally_then_all_reduces_twice():
    intra, inter = hierarchical_2x2()
    placement = (0, 0, 1, 1)
    assert group_rank_sets(intra, placement) == []
    assert_plans(
        intra,
        placement,
        {
            0: Plan(0, local=LocalCombine(((0, ((0, 0.5), (1, 0.5))), (1, ((1, 0.5), (0, 0.5)))))),
            1: Plan(1, local=LocalCombine(((2, ((2, 0.5), (3, 0.5))), (3, ((3, 0.5), (2, 0.5)))))),
        },
    )
    # components {0, 2} and {1, 3} both span ranks 0 and 1: two all-reduces over the same ranks, in that order
    assert group_rank_sets(inter, placement) == [(0, 1), (0, 1)]
    assert_plans(
        inter,
        placement,
        {
            0: Plan(0, allreduces=(AllReduce((0, 1), ((0, 0.5),), (0,)), AllReduce((0, 1), ((1, 0.5),), (1,)))),
            1: Plan(1, allreduces=(AllReduce((0, 1), ((2, 0.5),), (2,)), AllReduce((0, 1), ((3, 0.5),), (3,)))),
        },
    )
    assert compile_plan(inter, placement, 0).messages() == 2
    assert compile_plan(intra, placement, 0).messages() == 0


# -- push-sum -------------------------------------------------------------------------------


def test_directed_push_sum_sends_along_out_edges_and_receives_along_in_edges():
    """Edges 0->1, 1->2, 2->3, 3->0, 0->2; agent i keeps and sends 1/(out_degree + 1) of its mass."""
    t = load(TOPOLOGIES / "directed_push_sum.yaml")
    assert t.push_sum and t.placement == (0, 1, 2, 3)
    P = only_matrix(t)
    h = 0.5
    np.testing.assert_allclose(P, [[T, T, T, 0], [0, h, h, 0], [0, 0, h, h], [h, 0, 0, h]], atol=1e-15)
    expected = {
        0: Plan(
            0, exchange=Exchange(sends=((1, (0,)), (2, (0,))), recvs=((3, (3,)),), combine=((0, ((0, T), (3, h))),))
        ),
        1: Plan(1, exchange=Exchange(sends=((2, (1,)),), recvs=((0, (0,)),), combine=((1, ((1, h), (0, T))),))),
        2: Plan(
            2,
            exchange=Exchange(
                sends=((3, (2,)),), recvs=((0, (0,)), (1, (1,))), combine=((2, ((2, h), (0, T), (1, h))),)
            ),
        ),
        3: Plan(3, exchange=Exchange(sends=((0, (3,)),), recvs=((2, (2,)),), combine=((3, ((3, h), (2, h))),))),
    }
    assert_plans(P, t.placement, expected)
    # a directed graph: who sends to whom is not who receives from whom
    assert [compile_plan(P, t.placement, r).messages() for r in range(4)] == [2, 1, 1, 1]


def test_hand_made_row_stochastic_matrix_with_a_sender_that_keeps_nothing():
    """Agent 1 pushes all its mass to agent 2 and keeps none: rank 1 takes nothing from itself."""
    P = np.array([[0.5, 0.0, 0.5], [0.0, 0.0, 1.0], [0.25, 0.25, 0.5]])
    assert np.allclose(P.sum(axis=1), 1.0)
    expected = {
        0: Plan(0, exchange=Exchange(sends=((2, (0,)),), recvs=((2, (2,)),), combine=((0, ((0, 0.5), (2, 0.25))),))),
        1: Plan(1, exchange=Exchange(sends=((2, (1,)),), recvs=((2, (2,)),), combine=((1, ((2, 0.25),)),))),
        2: Plan(
            2,
            exchange=Exchange(
                sends=((0, (2,)), (1, (2,))),
                recvs=((0, (0,)), (1, (1,))),
                combine=((2, ((2, 0.5), (0, 0.5), (1, 1.0))),),
            ),
        ),
    }
    assert_plans(P, (0, 1, 2), expected)


# -- two agents: Lookahead ----------------------------------------------------------------------


def two_agent(alpha):
    t = builtin("two_agent", alpha=alpha, tau=3)
    assert t.roles == ("fast", "slow") and [ph.repeat for ph in t.schedule.phases] == [2, 1]
    local, sync = only_matrix(t, 0), only_matrix(t, 1)
    assert np.array_equal(local, np.eye(2))
    np.testing.assert_allclose(sync, [[alpha, alpha], [1 - alpha, 1 - alpha]], rtol=0, atol=1e-15)
    return local, sync


def test_two_agents_on_one_rank_are_local_arithmetic_only():
    local, sync = two_agent(0.3)
    assert compile_plan(local, (0, 0), 0) == Plan(0) and compile_plan(local, (0, 0), 0).is_noop
    assert group_rank_sets(sync, (0, 0)) == []
    assert_plans(sync, (0, 0), {0: Plan(0, local=LocalCombine(((0, ((0, 0.3), (1, 0.7))), (1, ((1, 0.7), (0, 0.3))))))})
    plan = compile_plan(sync, (0, 0), 0)
    assert plan.messages() == 0 and plan.bytes_sent(1000) == 0 and plan.send_peers() == ()


def test_two_agents_on_two_ranks_are_one_weighted_all_reduce():
    local, sync = two_agent(0.3)
    for r in (0, 1):
        assert compile_plan(local, (0, 1), r).is_noop
    assert group_rank_sets(sync, (0, 1)) == [(0, 1)]
    assert_plans(
        sync,
        (0, 1),
        {
            0: Plan(0, allreduces=(AllReduce((0, 1), ((0, 0.3),), (0,)),)),
            1: Plan(1, allreduces=(AllReduce((0, 1), ((1, 0.7),), (1,)),)),
        },
    )


def test_alpha_one_slow_rank_contributes_nothing_but_still_joins_the_all_reduce():
    _, sync = two_agent(1.0)
    assert_plans(
        sync,
        (0, 1),
        {
            0: Plan(0, allreduces=(AllReduce((0, 1), ((0, 1.0),), (0,)),)),
            1: Plan(1, allreduces=(AllReduce((0, 1), (), (1,)),)),
        },
    )


# -- properties over every shipped topology ------------------------------------------------------


def shipped_phases():
    for path in sorted(TOPOLOGIES.glob("*.yaml")):
        try:
            t = load(path)
        except Exception:  # sized by the world size: ring, complete, ...
            t = load(path, world_size=4)
        for k, ph in enumerate(t.schedule.phases):
            yield pytest.param(np.array(ph.matrix), t.placement, id=f"{path.stem}-{k}")


@pytest.mark.parametrize("P, placement", list(shipped_phases()))
def test_every_send_has_its_receive_and_every_entry_is_realised_once(P, placement):
    """What rank r sends to p is exactly what p receives from r, and every non-zero P[i, j] is used once."""
    world = max(placement) + 1
    plans = [compile_plan(P, placement, r) for r in range(world)]
    sends = {(p.rank, peer): agents for p in plans if p.exchange for peer, agents in p.exchange.sends}
    recvs = {(peer, p.rank): agents for p in plans if p.exchange for peer, agents in p.exchange.recvs}
    assert sends == recvs
    for r, p in enumerate(plans):
        for peer, agents in p.exchange.sends if p.exchange else ():
            assert peer != r and all(placement[i] == r for i in agents)
    # rebuild P from the plans: combine weights directly; the m-th all-reduce over a rank set S on every
    # member of S is one collective, whose receivers all take sum_i c_i x_i over every member's coeffs
    Q = np.eye(len(placement))
    collectives: dict = {}
    for p in plans:
        for combine in (p.exchange.combine if p.exchange else ()), (p.local.combine if p.local else ()):
            for j, ws in combine:
                Q[:, j] = 0.0
                for i, w in ws:
                    Q[i, j] = w
        for m, ar in enumerate(p.allreduces):
            occurrence = sum(1 for other in p.allreduces[:m] if other.ranks == ar.ranks)
            receivers, coeffs = collectives.setdefault((ar.ranks, occurrence), ([], []))
            receivers.extend(ar.receivers)
            coeffs.extend(ar.coeffs)
    for receivers, coeffs in collectives.values():
        Q[:, receivers] = 0.0
        for i, c in coeffs:
            Q[i, receivers] = c
    np.testing.assert_array_equal(Q, P)
    # every rank issues the all-reduces over the same rank sets in the same order
    for p in plans:
        assert [ar.ranks for ar in p.allreduces] == [g for g in group_rank_sets(P, placement) if p.rank in g]


def test_components_and_bad_placement():
    P = np.array([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    assert components(P) == [[0, 1], [2], [3]]
    assert components(np.eye(3)) == [[0], [1], [2]]
    assert compile_plan(np.eye(3), (0, 1, 2), 1) == Plan(1)
    with pytest.raises(ValueError, match="placement has 3 entries for 4 agents"):
        compile_plan(P, (0, 1, 2), 0)
