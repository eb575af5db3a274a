"""The planner: rows computed by hand on small clusters, DFT consensus rates against eigendecompositions, the
recommendation and the command line (no processes)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lookahead_dist.costmodel import Links, hierarchical_allreduce_time, ring_allreduce_time
from lookahead_dist.errors import ConfigError
from lookahead_dist.generators import GENERATORS, exponential, one_peer_exponential, ring, torus
from lookahead_dist.mixing import Phase, Schedule, consensus_rate
from lookahead_dist.planner import (
    Row,
    consensus_rate_fast,
    main,
    parse_count,
    parse_rate,
    parse_time,
    plan_rows,
    recommend,
)

GBIT = 10e9
B = GBIT / 8 * 1448 / 1514
MB = 4_000_000  # 1M float32 parameters
LINKS = Links(GBIT, op_overhead_s=0.0, memory_bytes_per_s=1e30, intra_bandwidth_bits=8e12)


@pytest.fixture(scope="module")
def rows8():
    return {r.name: r for r in plan_rows(8, 4, LINKS, 1e6, compute_s=0.1)}


def test_every_family_has_a_row(rows8):
    assert set(rows8) == {
        "ring",
        "torus",
        "exponential",
        "one-peer exponential",
        "hierarchical (ring across nodes)",
        "hierarchical (exponential across nodes)",
        "complete (parameter all-reduce)",
        "all-reduce SGD (DDP)",
        "local SGD tau=4",
        "local SGD tau=12",
        "local SGD tau=48",
        "SlowMo tau=12 over one-peer exp.",
        "SlowMo tau=48 over one-peer exp.",
    }
    assert rows8["torus"].note.startswith("not built")  # 8 = 2 x 4 has no torus with both sides >= 3


def test_rows_by_hand(rows8):
    # 8 ranks on 4 nodes of 2, 4 MB per rank, 10 Gbit/s
    ring8 = rows8["ring"]  # each node sends one buffer out each way: 8 MB through the NIC
    assert ring8.comm_s == pytest.approx(2 * MB / B) and ring8.bytes_per_rank == 2 * MB
    assert ring8.blocking_s == pytest.approx(0.1 + 2 * MB / B) and ring8.overlapped_s == pytest.approx(0.1)
    # one-peer exponential, hops 1, 2, 4: from node 0 (ranks 0, 1) one message leaves at hop 1, two at hops 2, 4
    op = rows8["one-peer exponential"]
    assert op.comm_s == pytest.approx((1 + 2 + 2) / 3 * MB / B) and op.steps == 3 and op.rate == 0
    # complete: hierarchical all-reduce, 2 ranks per node, 4 nodes
    ar = hierarchical_allreduce_time(MB, 4, 2, LINKS)
    assert rows8["complete (parameter all-reduce)"].comm_s == pytest.approx(ar)
    assert ar == pytest.approx(1.5 * MB / B + 1.0 * MB / 1e12)
    assert rows8["all-reduce SGD (DDP)"].comm_s == pytest.approx(ar)
    # local SGD averages every tau steps and cannot overlap
    loc = rows8["local SGD tau=4"]
    assert loc.comm_s == pytest.approx(ar / 4) and loc.steps == 4 and loc.overlapped_s == loc.blocking_s
    # exponential on 8: rate 1 - 2/(1 + log2 8) = 0.5 (ANCHORS: spectral gap 0.50), 0.5^10 < 1e-3
    ex = rows8["exponential"]
    assert ex.rate == pytest.approx(0.5) and ex.steps == 10
    assert ex.time_to_eps_s == pytest.approx(10 * ex.blocking_s)
    # SlowMo over one-peer exponential: consensus at the base's 3 steps, before tau
    sm = rows8["SlowMo tau=12 over one-peer exp."]
    assert sm.steps == 3 and sm.comm_s == pytest.approx(op.comm_s + ar / 12)


@pytest.mark.parametrize(
    "phases, shape",
    [
        ([Phase(ring(12))], None),
        ([Phase(exponential(10))], None),
        (one_peer_exponential(6), None),
        ([Phase(torus(3, 4))], (3, 4)),
        ([Phase(torus(4, 5))], (4, 5)),
        ([Phase(ring(9), 3), Phase(exponential(9))], None),
    ],
)
def test_dft_rates_equal_the_eigendecomposition(phases, shape):
    dense = consensus_rate(Schedule(phases).period_product())  # the dense eigenvalues of the period product
    assert consensus_rate_fast(phases, shape) == pytest.approx(dense, abs=1e-10)


def test_dft_rate_falls_back_for_a_matrix_that_is_not_circulant():
    phases = GENERATORS["hierarchical"].phases(None, nodes=3, per_node=2)
    dense = consensus_rate(Schedule(phases).period_product())
    assert consensus_rate_fast(phases) == pytest.approx(dense, abs=1e-10)
    assert consensus_rate_fast(one_peer_exponential(8)) == pytest.approx(0.0, abs=1e-12)


def test_ring_spectral_gap_matches_the_anchor_table():
    # ANCHORS.md: spectral gap of the ring 0.195 at n = 8, 3.2e-3 at 64
    assert 1 - consensus_rate_fast([Phase(ring(8))]) == pytest.approx(0.195, abs=5e-4)
    assert 1 - consensus_rate_fast([Phase(ring(64))]) == pytest.approx(3.2e-3, abs=5e-5)


def _row(name, blocking, steps, comm=0.01):
    return Row(name, 1.0, comm, 0.5, steps, blocking, blocking)


def test_recommend_takes_the_fastest_within_the_consensus_bound():
    rows = [_row("all-reduce SGD (DDP)", 0.2, 1), _row("gossip", 0.12, 10), _row("local SGD tau=48", 0.1, 48)]
    best, why = recommend(rows, 32)
    assert best.name == "gossip"
    assert "1.67x faster per step than all-reduce SGD" in why and "local SGD tau=48" in why
    best, _ = recommend(rows, 64)
    assert best.name == "local SGD tau=48"
    best, _ = recommend(rows, 1)
    assert best.name == "all-reduce SGD (DDP)"
    with pytest.raises(ConfigError, match="max-consensus-steps"):
        recommend([_row("ring", 0.1, math.inf)], 32)


def test_parsers():
    assert parse_rate("25gbit") == 25e9 and parse_rate("500mbit") == 5e8
    assert parse_time("5us") == pytest.approx(5e-6) and parse_time("0") == 0.0
    assert parse_count("25M") == 25e6 and parse_count("25.6m") == pytest.approx(25.6e6)
    for bad, fn, name in (
        ("fast", parse_rate, "--bandwidth"),
        ("5 parsecs", parse_time, "--latency"),
        ("0", parse_count, "--params"),
    ):
        with pytest.raises(ConfigError, match=name):
            fn(bad)
    with pytest.raises(ConfigError, match="--nodes"):
        plan_rows(8, 3, LINKS, 1e6)


def test_command_line_prints_the_table_and_a_recommendation(capsys):
    code = main(
        [
            "--world-size",
            "16",
            "--nodes",
            "4",
            "--bandwidth",
            "10gbit",
            "--latency",
            "5us",
            "--params",
            "1M",
            "--compute-ms",
            "50",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "| one-peer exponential |" in out and "| torus |" in out and "recommended: " in out
    assert main(["--world-size", "16", "--nodes", "3", "--bandwidth", "10gbit", "--params", "1M"]) == 2
    assert "--nodes" in capsys.readouterr().err


def test_planner_speed_uses_symmetry():
    # only rank 0's plan is compiled for a circulant matrix: 256 ranks of exponential stay cheap
    from lookahead_dist.costmodel import traffic_of_phase

    cache: dict = {}
    t = traffic_of_phase(exponential(256), tuple(range(256)), 10, cache)
    ((s, plans),) = cache.values()
    assert s == 1 and len(plans) == 1 and len(t) == 256
    assert ring_allreduce_time(10, 1, 1.0) == 0.0
    assert np.all([len(x.sends) == 8 for x in t])


def test_hierarchical_rows_need_several_ranks_per_node():
    rows = {r.name: r for r in plan_rows(8, 8, LINKS, 1e6)}
    assert rows["hierarchical (ring across nodes)"].note == (
        "not built: one rank per node: the same as the graph across nodes"
    )
    assert math.isnan(rows["hierarchical (exponential across nodes)"].blocking_s)


def test_topology_command_line_delegates_plan(capsys):
    from lookahead_dist.topology_cli import main as topology_main

    code = topology_main(["--plan", "--world-size", "8", "--nodes", "4", "--bandwidth", "1gbit", "--params", "1M"])
    assert code == 0 and "recommended: " in capsys.readouterr().out


def test_plan_rows_at_65536_ranks_read_the_phases_without_compiling_plans(monkeypatch):
    # the cost of every row comes from the phases' stored entries (O(nnz) arrays), never from 65,536 plans
    import lookahead_dist.traffic as traffic

    def refuse(*args, **kwargs):
        raise AssertionError("a plan was compiled")

    monkeypatch.setattr(traffic, "compile_plan", refuse)
    rows = {r.name: r for r in plan_rows(65_536, 8_192, Links(25e9, op_overhead_s=0.0), 25e6)}
    assert rows["ring"].bytes_per_rank == 2 * 100e6  # two 100 MB buffers out of each rank
    assert rows["complete (parameter all-reduce)"].rate == 0.0
