"""Topologies: built-in generators, the YAML loader, its errors, the command line."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lookahead_dist import generators as gen
from lookahead_dist import topology
from lookahead_dist.errors import TopologyError
from lookahead_dist.mixing import check_column_stochastic, consensus_rate, lookahead_matrix
from lookahead_dist.topology import builtin, from_mapping, load, main

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"

# The world sizes each shipped file is documented to accept (see the comment at its top).
WORLD_SIZES = {
    "ring.yaml": [1, 2, 3, 4, 8, 13],
    "torus.yaml": [9],
    "complete.yaml": [1, 4, 7],
    "star.yaml": [1, 2, 5, 8],
    "hypercube.yaml": [1, 2, 4, 8, 16],
    "exponential.yaml": [1, 2, 3, 4, 5, 8, 12],
    "one_peer_exponential.yaml": [1, 2, 3, 4, 6, 8],
    "two_agent.yaml": [2],
    "hierarchical.yaml": [4],
    "time_varying.yaml": [4],
    "directed_push_sum.yaml": [4],
    "edges_example.yaml": [4],
    "slow_agent_own_rank.yaml": [5],
}
SETTINGS = settings(max_examples=25, deadline=None)


def write(tmp_path, text, name="topo.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def offdiag_counts(P):
    nz = (P != 0) & ~np.eye(P.shape[0], dtype=bool)
    return nz.sum(axis=0), nz.sum(axis=1)  # in-degree (column), out-degree (row)


def assert_valid(t):
    for ph in t.schedule.phases:
        M = ph.matrix.T if t.push_sum else ph.matrix
        check_column_stochastic(M)
    assert t.schedule.consensus_rate() < 1
    assert len(t.roles) == len(t.placement) == t.n
    assert set(t.roles) <= {"fast", "slow"} and t.fast_agents
    assert sorted(a for r in range(t.world_size) for a in t.agents_on(r)) == list(range(t.n))


# -- shipped files ---------------------------------------------------------------------


def test_every_shipped_file_is_listed():
    assert sorted(p.name for p in TOPOLOGIES.glob("*.yaml")) == sorted(WORLD_SIZES)


@pytest.mark.parametrize("path", sorted(TOPOLOGIES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_file_loads(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ") and any("world size" in line.lower() for line in lines[:3])
    for w in WORLD_SIZES[path.name]:
        t = load(path, world_size=w)
        assert t.world_size == w and t.source == str(path) and t.name == path.stem
        assert_valid(t)


def test_shipped_directed_push_sum_is_row_but_not_column_stochastic():
    t = load(TOPOLOGIES / "directed_push_sum.yaml", world_size=4)
    P = t.schedule.matrix(0)
    assert t.push_sum
    np.testing.assert_allclose(P.sum(axis=1), 1.0, atol=1e-15)
    assert np.max(np.abs(P.sum(axis=0) - 1)) > 0.1
    indeg, outdeg = offdiag_counts(P)
    assert len(set(outdeg.tolist())) > 1  # not regular


def test_shipped_slow_agent_own_rank():
    t = load(TOPOLOGIES / "slow_agent_own_rank.yaml")
    assert t.n == 5 and t.world_size == 5 and t.slow_agents == (4,) and t.fast_agents == (0, 1, 2, 3)
    assert t.agents_on(4) == (4,) and t.schedule.period == 4
    alpha = 0.5
    sync = t.schedule.matrix(3)
    for j in range(5):
        np.testing.assert_array_equal(sync[:, j], [alpha / 4] * 4 + [1 - alpha])
    for k in range(3):
        assert t.schedule.is_identity(k)
    np.testing.assert_allclose(t.schedule.invariant_vector(), [alpha / 4] * 4 + [1 - alpha], atol=1e-15)


def test_shipped_two_agent_is_lookahead():
    t = load(TOPOLOGIES / "two_agent.yaml")
    assert t.roles == ("fast", "slow") and t.world_size == 2 and t.agents_on(1) == (1,) and t.schedule.period == 5
    np.testing.assert_array_equal(t.schedule.matrix(4), lookahead_matrix(0.5))
    np.testing.assert_allclose(t.schedule.invariant_vector(), [0.5, 0.5])


def test_shipped_time_varying_and_hierarchical():
    t = load(TOPOLOGIES / "time_varying.yaml")
    assert len(t.schedule.phases) >= 2 and t.schedule.phases[0].repeat == 3
    assert not np.array_equal(t.schedule.phases[0].matrix, t.schedule.phases[1].matrix)
    h = load(TOPOLOGIES / "hierarchical.yaml")
    np.testing.assert_allclose(h.schedule.period_product(), np.kron(gen.ring(2), np.full((2, 2), 0.5)), atol=1e-15)


def test_shipped_edges_example_weights():
    t = load(TOPOLOGIES / "edges_example.yaml")
    P = t.schedule.matrix(0)
    assert P[0, 1] == 0.3 and P[2, 3] == 0.4 and P[3, 0] == 0.25 and P[2, 0] == 0.25
    assert P[0, 0] == 0.5 and P[1, 1] == 0.7


# -- generators ------------------------------------------------------------------------


def assert_doubly_stochastic(P):
    np.testing.assert_allclose(P.sum(axis=0), 1.0, atol=1e-14)
    np.testing.assert_allclose(P.sum(axis=1), 1.0, atol=1e-14)
    assert (P >= 0).all() and P.dtype == np.float64


@SETTINGS
@given(st.integers(3, 40))
def test_ring_degrees(n):
    P = gen.ring(n)
    assert_doubly_stochastic(P)
    np.testing.assert_array_equal(P, P.T)
    indeg, _ = offdiag_counts(P)
    assert (indeg == 2).all()
    assert P[0, 1] == pytest.approx(1 / 3)


def test_small_rings():
    assert gen.ring(1).tolist() == [[1.0]]
    assert gen.ring(2).tolist() == [[0.5, 0.5], [0.5, 0.5]]


@SETTINGS
@given(st.integers(3, 8), st.integers(3, 8))
def test_torus_degrees(rows, cols):
    P = gen.torus(rows, cols)
    assert P.shape == (rows * cols,) * 2
    assert_doubly_stochastic(P)
    indeg, _ = offdiag_counts(P)
    assert (indeg == 4).all()
    assert P[0, 1] == pytest.approx(0.2) and P[0, cols] == pytest.approx(0.2) and P[0, cols - 1] == pytest.approx(0.2)


@SETTINGS
@given(st.integers(0, 7))
def test_hypercube_degrees(d):
    P = gen.hypercube(2**d)
    assert_doubly_stochastic(P)
    indeg, _ = offdiag_counts(P)
    assert (indeg == d).all()
    for m in range(d):
        assert P[0, 1 << m] == pytest.approx(1 / (d + 1))


@SETTINGS
@given(st.integers(2, 70))
def test_exponential_degrees(n):
    P = gen.exponential(n)
    assert_doubly_stochastic(P)
    peers = int(np.floor(np.log2(n - 1))) + 1
    indeg, outdeg = offdiag_counts(P)
    assert (indeg == peers).all() and (outdeg == peers).all()
    for m in range(peers):
        assert P[0, (2**m) % n] == pytest.approx(1 / (peers + 1))
    assert consensus_rate(P) < 1


@SETTINGS
@given(st.integers(2, 40))
def test_star_degrees(n):
    P = gen.star(n)
    assert_doubly_stochastic(P)
    indeg, _ = offdiag_counts(P)
    assert indeg[0] == n - 1 and (indeg[1:] == 1).all()
    assert P[0, 0] == pytest.approx(1 / n) and P[1, 1] == pytest.approx(1 - 1 / n)


@SETTINGS
@given(st.integers(1, 50))
def test_complete_averages_in_one_step(n):
    P = gen.complete(n)
    X = np.random.default_rng(n).normal(size=(3, n))
    np.testing.assert_allclose(X @ P, np.repeat(X.mean(axis=1, keepdims=True), n, axis=1), rtol=0, atol=1e-14)


@pytest.mark.parametrize("d", range(0, 8))
def test_one_peer_exponential_averages_exactly(d):
    n = 2**d
    phases = gen.one_peer_exponential(n)
    assert len(phases) == max(d, 1)
    prod = np.eye(n)
    for ph in phases:
        P = ph.matrix
        assert_doubly_stochastic(P)
        indeg, outdeg = offdiag_counts(P)
        assert (indeg == (n > 1)).all() and (outdeg == (n > 1)).all()
        prod = prod @ P
    assert np.max(np.abs(prod - np.full((n, n), 1 / n))) <= 1e-15


@pytest.mark.parametrize("n", [3, 5, 6, 7, 12])
def test_one_peer_exponential_other_sizes_reach_consensus(n):
    t = builtin("one_peer_exponential", world_size=n)
    assert len(t.schedule.phases) == int(np.ceil(np.log2(n)))
    assert t.schedule.consensus_rate() < 1


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 4), st.sampled_from(gen.STATIC_INTER))
def test_hierarchical_product(nodes, per_node, inter):
    if inter == "hypercube" and nodes & (nodes - 1):
        return
    phases = gen.hierarchical(nodes, per_node, inter)
    W = gen.GENERATORS[inter].func(nodes)
    assert len(phases) == 2
    prod = phases[0].matrix @ phases[1].matrix
    assert np.max(np.abs(prod - np.kron(W, np.full((per_node, per_node), 1 / per_node)))) <= 1e-15
    # agent a of node u mixes only with agent a of other nodes in the inter phase
    inter_P = phases[1].matrix
    for i, j in zip(*np.nonzero(inter_P)):
        assert i % per_node == j % per_node


def test_two_agent_generator():
    phases = gen.two_agent(0.3, 4)
    assert [p.repeat for p in phases] == [3, 1]
    np.testing.assert_array_equal(phases[1].matrix, lookahead_matrix(0.3))


def test_metropolis_hastings_random_graph():
    G = nx.gnp_random_graph(15, 0.3, seed=1)
    P = gen.metropolis_hastings(G)
    assert_doubly_stochastic(P)
    np.testing.assert_array_equal(P, P.T)
    u, v = next(iter(G.edges()))
    assert P[u, v] == 1 / (1 + max(G.degree(u), G.degree(v)))
    with pytest.raises(TopologyError, match="undirected"):
        gen.metropolis_hastings(nx.DiGraph([(0, 1)]))


def test_registry_describes_parameters():
    assert gen.generator_names() == sorted(gen.GENERATORS)
    assert gen.GENERATORS["hierarchical"].signature() == "hierarchical(nodes: int, per_node: int, inter: str = 'ring')"
    assert gen.GENERATORS["two_agent"].roles == ("fast", "slow")
    with pytest.raises(TopologyError, match=r"unknown parameter; ring takes ring\(n: int\)"):
        gen.GENERATORS["ring"].phases(4, size=4)


# -- loading ---------------------------------------------------------------------------------


def test_builtin_and_world_size_inference():
    assert builtin("torus", rows=3, cols=4).n == 12
    assert builtin("torus", world_size=16).schedule.matrix(0).shape == (16, 16)
    t = builtin("ring", world_size=6)
    assert t.n == 6 and t.placement == tuple(range(6)) and t.roles == ("fast",) * 6
    assert builtin("two_agent", alpha=1.0, tau=3).schedule.consensus_rate() == 0.0
    assert builtin("hierarchical", world_size=6, per_node=3).schedule.phases[0].matrix[0, 2] == pytest.approx(1 / 3)


def test_alpha_one_lookahead_is_valid(tmp_path):
    t = load(write(tmp_path, "generator: {type: two_agent, alpha: 1, tau: 5}\n"))
    assert t.schedule.consensus_rate() == 0.0 and t.roles == ("fast", "slow")
    np.testing.assert_array_equal(t.schedule.matrix(4), [[1.0, 1.0], [0.0, 0.0]])


def test_name_defaults_to_file_stem(tmp_path):
    t = load(write(tmp_path, "generator: ring\nagents: 3\n", name="my_ring.yaml"))
    assert t.name == "my_ring" and t.description == ""


def test_unweighted_edges_rule():
    t = from_mapping({"nodes": 3, "edges": [[0, 1], [2, 1], [1, 2]]})
    P = t.schedule.matrix(0)
    np.testing.assert_allclose(P[:, 1], [1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(P[:, 2], [0, 0.5, 0.5])
    np.testing.assert_allclose(P[:, 0], [1, 0, 0])


def test_undirected_and_self_loop_edges():
    t = from_mapping({"nodes": 2, "edges": [[0, 1, 0.25]], "undirected": True})
    np.testing.assert_allclose(t.schedule.matrix(0), [[0.75, 0.25], [0.25, 0.75]])
    t = from_mapping({"edges": [[0, 0, 0.5], [1, 0, 0.5], [0, 1, 0.2]]})
    np.testing.assert_allclose(t.schedule.matrix(0), [[0.5, 0.2], [0.5, 0.8]])


def test_push_sum_edges_split_mass():
    t = from_mapping({"nodes": 3, "edges": [[0, 1], [0, 2], [1, 2], [2, 0]], "push_sum": True})
    P = t.schedule.matrix(0)
    np.testing.assert_allclose(P[0], [1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(P[1], [0, 0.5, 0.5])
    t = from_mapping({"nodes": 2, "edges": [[0, 1, 0.3], [1, 0, 0.6]], "push_sum": True})
    np.testing.assert_allclose(t.schedule.matrix(0), [[0.7, 0.3], [0.6, 0.4]])


def test_schedule_inserts_generator_phases_and_repeats_them():
    t = from_mapping(
        {
            "schedule": [
                {"generator": {"type": "two_agent", "tau": 3}, "repeat": 2},
                {"matrix": [[0.5, 0.5], [0.5, 0.5]], "repeat": 2},
            ]
        }
    )
    assert [p.repeat for p in t.schedule.phases] == [2, 1, 2, 1, 2]
    assert t.schedule.period == 8 and t.roles == ("fast", "slow")


def test_roles_mapping_placement_and_fingerprint():
    m = {"generator": "complete", "agents": 4, "roles": {"slow": [1, 3]}, "placement": [0, 0, 1, 1]}
    t = from_mapping(m)
    assert t.roles == ("fast", "slow", "fast", "slow") and t.slow_agents == (1, 3)
    assert t.world_size == 2 and t.agents_on(1) == (2, 3)
    assert from_mapping(dict(m)).fingerprint() == t.fingerprint()
    assert from_mapping({**m, "placement": [0, 1, 0, 1]}).fingerprint() != t.fingerprint()
    assert from_mapping({**m, "roles": {"slow": [3]}}).fingerprint() != t.fingerprint()


def test_allow_no_consensus(tmp_path):
    t = load(write(tmp_path, "agents: 3\nmatrix: [[1, 0, 0], [0, 1, 0], [0, 0, 1]]\nallow_no_consensus: true\n"))
    assert t.schedule.consensus_rate() == pytest.approx(1.0)


# -- errors: one test each ---------------------------------------------------------------------


def raises(tmp_path, text, pattern, world_size=None, name="topo.yaml"):
    path = write(tmp_path, text, name)
    with pytest.raises(TopologyError, match=pattern) as info:
        load(path, world_size=world_size)
    assert str(path) in str(info.value)
    return str(info.value)


def test_error_unknown_top_level_key(tmp_path):
    raises(tmp_path, "generator: ring\ncolour: red\n", r"topo\.yaml: colour: unknown key.*'colour'", 4)


def test_error_unknown_key_in_phase(tmp_path):
    raises(tmp_path, "schedule:\n  - {generator: ring, rpeat: 3}\n", r"schedule\[0\]\.rpeat: unknown key", 4)


def test_error_unknown_key_in_generator_mapping(tmp_path):
    raises(
        tmp_path,
        "generator: {type: torus, rows: 3, cols: 3, sides: 4}\n",
        r"generator\.sides: torus: unknown parameter; torus takes torus\(rows: int, cols: int\) \(got 4\)",
    )


def test_error_unknown_generator(tmp_path):
    raises(tmp_path, "generator: rign\n", r"generator: unknown generator; built-ins: .*ring.*\(got 'rign'\)", 4)


def test_error_repeat_wrong_type(tmp_path):
    raises(
        tmp_path,
        'schedule:\n  - {generator: ring, repeat: "two"}\n',
        r"schedule\[0\]\.repeat: must be an integer >= 1 \(got 'two'\)",
        4,
    )


def test_error_agents_wrong_type(tmp_path):
    raises(tmp_path, "agents: 2.5\ngenerator: ring\n", r"agents: must be an integer >= 1 \(got 2\.5\)")


def test_error_matrix_of_strings(tmp_path):
    raises(tmp_path, "matrix: [[a, b], [c, d]]\n", r"matrix\[0\]\[0\]: a weight must be a number \(got 'a'\)")


def test_error_ragged_matrix(tmp_path):
    raises(
        tmp_path, "matrix: [[0.5, 0.5], [0.5]]\n", r"matrix\[1\]: ragged matrix: row 1 has 1 entries but row 0 has 2"
    )


def test_error_non_square_matrix(tmp_path):
    raises(tmp_path, "matrix: [[0.5, 0.5, 0], [0.5, 0.5, 1]]\n", r"matrix: the matrix must be square: 2 rows of 3")


def test_error_negative_weight(tmp_path):
    raises(
        tmp_path,
        "schedule:\n  - matrix: [[1, 0], [0, 1]]\n  - matrix: [[1.5, 0.5], [-0.5, 0.5]]\n",
        r"schedule\[1\]\.matrix\[1\]\[0\]: weights must be >= 0 \(got -0\.5\)",
    )


def test_error_nan_weight(tmp_path):
    raises(
        tmp_path,
        "matrix: [[0.5, .nan], [0.5, 0.5]]\n",
        r"matrix\[0\]\[1\]: NaN/inf weights are not allowed \(got nan\)",
    )


def test_error_inf_weight(tmp_path):
    raises(tmp_path, "edges: [[0, 1, .inf]]\n", r"edges\[0\]\[2\]: NaN/inf weights are not allowed \(got inf\)")


def test_error_column_not_summing_to_one(tmp_path):
    raises(tmp_path, "matrix: [[1, 0.4], [0, 0.5]]\n", r"topo\.yaml: matrix: column 1 sums to 0\.9, not 1")


def test_error_push_sum_checks_rows(tmp_path):
    text = "matrix: [[0.5, 0.5], [0.5, 0.5]]\n"
    load(write(tmp_path, text + "push_sum: true\n", "ok.yaml"))
    raises(tmp_path, "matrix: [[1, 0.5], [0, 0.5]]\npush_sum: true\n", r"matrix: row 0 sums to 1\.5")


def test_error_world_size_does_not_fit_topology(tmp_path):
    raises(tmp_path, "agents: 4\ngenerator: ring\n", r"agents: 4 agents on the default placement .* world size is 3", 3)


def test_error_world_size_does_not_fit_matrix(tmp_path):
    raises(tmp_path, "matrix: [[1]]\n", r"matrix: gives 1 agents but the topology has 2 \(world size 2\)", 2)


def test_error_torus_side_too_small(tmp_path):
    raises(
        tmp_path,
        "generator: {type: torus, rows: 2, cols: 5}\n",
        r"generator\.rows: torus: a torus needs both sides >= 3 \(shape 2 x 5\) \(got 2\)",
    )


def test_error_torus_shape_does_not_match_world_size(tmp_path):
    raises(
        tmp_path,
        "generator: {type: torus, rows: 3, cols: 3}\n",
        r"generator\.rows: torus: rows \* cols = 3 \* 3 = 9 does not match the 8 agents \(n = 8 from world size 8\)",
        8,
    )


def test_error_hypercube_not_power_of_two(tmp_path):
    raises(tmp_path, "generator: hypercube\n", r"generator: hypercube: a hypercube needs a power of two agents", 6)


def test_error_two_agent_world_size(tmp_path):
    raises(tmp_path, "generator: two_agent\n", r"generator: two_agent: Lookahead has exactly 2 agents.*not 3", 3)


def test_error_placement_vs_world_size(tmp_path):
    raises(
        tmp_path,
        "generator: complete\nplacement: [0, 0, 1, 1]\n",
        r"placement: uses 2 ranks but the world size is 3",
        3,
    )


def test_error_placement_rank_without_agent(tmp_path):
    raises(tmp_path, "generator: complete\nplacement: [0, 0, 2, 2]\n", r"placement: ranks \[1\] host no agent")


def test_error_placement_rank_out_of_range(tmp_path):
    raises(tmp_path, "generator: complete\nplacement: [0, 1, 5]\n", r"placement\[2\]: rank out of range 0 \.\. 2", 3)


def test_error_edge_node_out_of_range(tmp_path):
    raises(
        tmp_path,
        "nodes: 3\nedges: [[0, 1], [1, 3]]\n",
        r"edges\[1\]\[1\]: node index out of range 0 \.\. 2 \(3 agents\) \(got 3\)",
    )


def test_error_role_node_out_of_range(tmp_path):
    raises(tmp_path, "generator: ring\nroles: {slow: [4]}\n", r"roles\.slow\[0\]: node index out of range 0 \.\. 3", 4)


def test_error_empty_schedule(tmp_path):
    raises(tmp_path, "schedule: []\n", r"schedule: empty schedule", 4)


def test_error_role_not_fast_or_slow(tmp_path):
    raises(
        tmp_path,
        "generator: ring\nroles: [fast, medium, fast]\n",
        r"roles\[1\]: a role is fast or slow \(got 'medium'\)",
    )


def test_error_roles_wrong_length(tmp_path):
    raises(tmp_path, "agents: 4\ngenerator: ring\nroles: [fast, slow, fast]\n", r"roles: lists 3 roles for 4 agents")


def test_error_no_fast_agent(tmp_path):
    raises(tmp_path, "generator: ring\nroles: [slow, slow, slow]\n", r"roles: at least one agent must be fast")


def test_error_never_reaches_consensus(tmp_path):
    msg = raises(
        tmp_path,
        "agents: 2\nschedule:\n  - {matrix: [[1, 0], [0, 1]], repeat: 4}\n",
        r"schedule: the schedule never reaches consensus: its period consensus rate is 1 >= 1",
    )
    assert "allow_no_consensus" in msg


def test_error_disconnected_groups_never_reach_consensus(tmp_path):
    raises(tmp_path, "nodes: 4\nedges: [[0, 1], [2, 3]]\nundirected: true\n", r"edges: .*never reaches consensus")


def test_error_malformed_yaml(tmp_path):
    raises(
        tmp_path,
        "generator: ring\nroles: [fast, slow\nplacement: [0, 1]\n",
        r"topo\.yaml:\d+: line \d+, column \d+: malformed YAML",
    )


def test_error_duplicate_yaml_key(tmp_path):
    raises(tmp_path, "generator: ring\ngenerator: star\n", r"topo\.yaml:2: .*duplicate key 'generator'")


def test_error_two_sources(tmp_path):
    raises(
        tmp_path,
        "generator: ring\nmatrix: [[1]]\n",
        r"\(top level\): give exactly one of generator, matrix, edges, schedule",
    )


def test_error_mixed_weighted_edges(tmp_path):
    raises(tmp_path, "edges: [[0, 1, 0.5], [1, 0]]\n", r"edges\[1\]: all edges must be weighted or none is")


def test_error_incoming_weights_above_one(tmp_path):
    raises(
        tmp_path,
        "edges: [[0, 1, 0.7], [2, 1, 0.5], [1, 0, 0.1], [1, 2, 0.1]]\n",
        r"edges: column 1: the weights of agent 1 sum to 1\.2 > 1",
    )


def test_error_self_loop_column_must_sum_to_one(tmp_path):
    raises(tmp_path, "edges: [[0, 0, 0.5], [1, 0, 0.4], [0, 1, 0.5]]\n", r"edges: column 0 sums to 0\.9")


def test_error_duplicate_edge(tmp_path):
    raises(tmp_path, "edges: [[0, 1], [1, 0]]\nundirected: true\n", r"edges: duplicate edge")


def test_error_not_a_mapping(tmp_path):
    raises(tmp_path, "- ring\n", r"\(top level\): a topology must be a mapping")


def test_error_missing_file(tmp_path):
    with pytest.raises(TopologyError, match=r"nope\.yaml: cannot read"):
        load(tmp_path / "nope.yaml")


# -- command line ---------------------------------------------------------------------------


def test_cli_prints_phases_and_rates(capsys):
    assert main([str(TOPOLOGIES / "ring.yaml"), "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "period consensus rate: 0.333333" in out and "per-step rate: 0.333333" in out
    assert "invariant vector: [0.25, 0.25, 0.25, 0.25]" in out
    assert "messages per step (distinct other ranks each rank sends to): every rank: 2" in out


def test_cli_notes_all_reduce_and_repeat(capsys):
    assert main([str(TOPOLOGIES / "slow_agent_own_rank.yaml")]) == 0
    out = capsys.readouterr().out
    assert "repeat 3" in out and "one all-reduce over ranks [0, 1, 2, 3, 4]" in out


def test_cli_sparsity_pattern_for_large_n(capsys):
    assert main([str(TOPOLOGIES / "ring.yaml"), "--world-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "xx.............x" in out


def test_cli_error_exit_code(tmp_path, capsys):
    bad = write(tmp_path, "generator: ring\nfoo: 1\n")
    assert main([str(bad), "--world-size", "4"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "foo" in err


def test_cli_module_subprocess():
    res = subprocess.run(
        [sys.executable, "-m", "lookahead_dist.topology", str(TOPOLOGIES / "hierarchical.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert re.search(r"period consensus rate: 0\b", res.stdout)


def test_cli_plot_writes_png(tmp_path, capsys):
    out = tmp_path / "topo.png"
    assert main([str(TOPOLOGIES / "time_varying.yaml"), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_is_importable_without_matplotlib_side_effects():
    text = topology.report(load(TOPOLOGIES / "two_agent.yaml"))
    assert "fast: [0]; slow: [1]" in text and "one all-reduce over ranks [0, 1]" in text
