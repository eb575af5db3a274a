"""The network cost model on cases computed by hand (no processes).

Units: B = 1 Gbit/s / 8 x 1448/1514 payload bytes/s unless a test says otherwise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from lookahead_dist.costmodel import (
    WIRE_FRACTION,
    Links,
    PhaseTraffic,
    RankTraffic,
    cpu_term_,
    hierarchical_allreduce_time,
    overlapped_step_time,
    phase_cost,
    phase_traffic,
    rank_traffic,
    ring_allreduce_time,
    schedule_cost,
    step_times,
    steps_to_consensus,
    traffic_of_phase,
    usable_bandwidth,
)
from lookahead_dist.errors import ConfigError
from lookahead_dist.generators import complete, exponential, hierarchical, one_peer_exponential, ring, torus
from lookahead_dist.mixing import Phase, Schedule
from lookahead_dist.plan import compile_plan

GBIT = 1e9
B = 1e9 / 8 * 1448 / 1514  # 119.55 MB/s
MB40 = 40_000_000
BARE = dict(op_overhead_s=0.0, memory_bytes_per_s=1e30)  # links without per-operation costs


def cost(P, world, rpn, links, nbytes=MB40, placement=None):
    sched = Schedule(P if isinstance(P, list) else [P])
    return schedule_cost(sched, placement or tuple(range(world)), nbytes, links, rpn)


def test_usable_bandwidth_is_the_tcp_payload_share_of_the_rate():
    assert usable_bandwidth(GBIT) == pytest.approx(119_550_858.65, rel=1e-9)
    assert Links(GBIT).inter_bytes_per_s == usable_bandwidth(GBIT)
    from lookahead_dist.cluster.netns import WIRE_FRACTION as CLUSTER_FRACTION
    from lookahead_dist.cluster.netns import usable_rate

    assert WIRE_FRACTION == CLUSTER_FRACTION and usable_rate(5e9) == usable_bandwidth(5e9)


def test_ring_exchange_on_8_nodes_is_twice_the_buffer_over_the_nic():
    # every node sends its 40 MB to its two neighbours: 80 MB through each NIC -> 0.669 s
    c = cost(ring(8), 8, 1, Links(GBIT, **BARE))
    assert c.comm_s == pytest.approx(80e6 / B, rel=1e-12)
    assert c.comm_s == pytest.approx(0.669, abs=5e-4)
    assert c.bytes_per_rank == 80e6
    assert np.all(c.phases[0].node_egress == 80e6)


def test_latency_once_and_overhead_per_message():
    # ring: 2 sends + 2 receives per rank -> latency + 4 x overhead on top of the bandwidth term
    c = cost(ring(8), 8, 1, Links(GBIT, latency_s=1e-3, op_overhead_s=2e-4, memory_bytes_per_s=1e30))
    assert c.comm_s == pytest.approx(80e6 / B + 1e-3 + 4 * 2e-4, rel=1e-12)


def test_complete_is_one_ring_allreduce():
    # 2 (p - 1)/p x bytes / B = 14/8 x 40 MB / B = 0.585 s, plus 2 (p - 1) = 14 steps of latency + overhead
    links = Links(GBIT, latency_s=1e-4, op_overhead_s=2e-4, memory_bytes_per_s=1e30)
    c = cost(complete(8), 8, 1, links)
    assert c.comm_s == pytest.approx(14 / 8 * MB40 / B + 14 * 3e-4, rel=1e-12)
    assert c.bytes_per_rank == 14 * MB40 // 8
    assert ring_allreduce_time(MB40, 8, B) == pytest.approx(0.5855, abs=1e-4)


def test_node_egress_adds_all_ranks_of_a_node():
    # ring of 8 ranks on 4 nodes of 2: rank 2u talks to 2u - 1 (other node) and 2u + 1 (same node);
    # each node sends one buffer out per direction -> 2 x 40 MB through its NIC
    c = cost(ring(8), 8, 2, Links(GBIT, **BARE))
    assert np.all(c.phases[0].node_egress == 2 * MB40)
    assert c.comm_s == pytest.approx(2 * MB40 / B, rel=1e-12)
    # exponential on 8 ranks, 4 nodes: rank r sends to r+1, r+2, r+4; from node 0 (ranks 0, 1):
    # 0->1 stays inside, 0->2, 0->4, 1->2, 1->3, 1->5 leave: 5 buffers
    e = cost(exponential(8), 8, 2, Links(GBIT, **BARE))
    assert np.all(e.phases[0].node_egress == 5 * MB40)
    assert e.comm_s == pytest.approx(5 * MB40 / B, rel=1e-12)


def test_intra_node_messages_use_the_intra_bandwidth():
    # 2 ranks on one node exchanging (a 2-ring): 40 MB at 8 Gbit/s = 1 GB/s -> 0.04 s, no NIC traffic
    c = cost(ring(2), 2, 2, Links(GBIT, intra_bandwidth_bits=8e9, **BARE))
    assert c.phases[0].node_egress.tolist() == [0.0]
    assert c.comm_s == pytest.approx(0.04, rel=1e-12)


def test_hierarchical_schedule_by_hand():
    # 4 nodes x 2 ranks, inter = ring: phase 0 averages inside each node (an all-reduce of 2 ranks at
    # intra bandwidth: 2 x 1/2 x 40 MB / 10 GB/s = 4 ms); phase 1: each rank sends its buffer to the
    # same local rank of the two neighbouring nodes: 2 ranks x 2 peers x 40 MB = 160 MB per NIC
    links = Links(GBIT, intra_bandwidth_bits=80e9, **BARE)
    c = cost(hierarchical(4, 2), 8, 2, links)
    assert c.phases[0].comm_s.tolist() == pytest.approx([MB40 / 10e9] * 8)
    assert c.phases[1].comm_s.tolist() == pytest.approx([160e6 / B] * 8)
    assert c.comm_s == pytest.approx((MB40 / 10e9 + 160e6 / B) / 2)


def test_hierarchical_allreduce_formula():
    links = Links(GBIT, latency_s=5e-6, intra_bandwidth_bits=800e9, op_overhead_s=1e-5)
    # 4 nodes: 2 x 3/4 x bytes / B + 6 x (5 + 10) us; 8 per node: 2 x 7/8 x bytes / 100 GB/s + 14 x 10 us
    want = 1.5 * MB40 / B + 6 * 15e-6 + 1.75 * MB40 / 100e9 + 14 * 1e-5
    assert hierarchical_allreduce_time(MB40, 4, 8, links) == pytest.approx(want, rel=1e-12)
    # "auto" picks it for an all-reduce over 32 ranks on 4 nodes; "ring" runs the flat ring of 32
    auto = cost(complete(32), 32, 8, Links(GBIT, latency_s=5e-6, op_overhead_s=1e-5, memory_bytes_per_s=1e30))
    assert auto.comm_s == pytest.approx(want, rel=1e-12)
    flat = cost(
        complete(32), 32, 8, Links(GBIT, latency_s=5e-6, op_overhead_s=1e-5, memory_bytes_per_s=1e30, allreduce="ring")
    )
    assert flat.comm_s == pytest.approx(2 * 31 / 32 * MB40 / B + 62 * 15e-6, rel=1e-12)


def test_ring_allreduce_counts_ring_hops_leaving_one_node():
    # ranks 0 and 2 on node 0, 1 and 3 on node 1 (placement by agent): a ring 0-1-2-3-0 leaves
    # each node twice, so each NIC carries two hops' chunks
    t = [RankTraffic(r, allreduces=((0, 1, 2, 3),)) for r in range(4)]
    links = Links(GBIT, allreduce="ring", **BARE)
    c = phase_cost(t, MB40, 1, links)  # one rank per node: one hop per NIC
    assert c.comm_s.tolist() == pytest.approx([ring_allreduce_time(MB40, 4, B)] * 4)
    two = phase_cost([RankTraffic(r, allreduces=((0, 1, 2, 3),)) for r in range(4)], MB40, 2, links)
    assert two.comm_s[0] == pytest.approx(ring_allreduce_time(MB40, 4, B), rel=1e-12)  # 0,1 | 2,3: one hop out


def test_cpu_term_takes_over_when_the_cores_are_the_limit():
    # ring on 8 nodes moves 8 x 80 MB = 640 MB in all; at 0.5 GB/s that takes 1.28 s > 0.669 s on the links
    slow = cost(ring(8), 8, 1, Links(GBIT, cpu_bytes_per_s=0.5e9, **BARE))
    assert slow.cpu_limited and slow.comm_s == pytest.approx(1.28, rel=1e-12)
    fast = cost(ring(8), 8, 1, Links(GBIT, cpu_bytes_per_s=2e9, **BARE))
    assert not fast.cpu_limited and fast.comm_s == pytest.approx(80e6 / B, rel=1e-12)
    # the part that does not overlap: max + s x min; 640 MB at 1 GB/s = 0.64 s beside 0.669 s on the links
    part = cost(ring(8), 8, 1, Links(GBIT, cpu_bytes_per_s=1e9, cpu_serial_fraction=0.5, **BARE))
    assert not part.cpu_limited and part.comm_s == pytest.approx(80e6 / B + 0.32, rel=1e-12)
    # an all-reduce over 8 moves 2 x 7 x 40 MB = 560 MB in all, at its own CPU rate: 560 MB / 0.5 GB/s = 1.12 s
    ar = cost(complete(8), 8, 1, Links(GBIT, cpu_bytes_per_s=1e12, cpu_allreduce_bytes_per_s=0.5e9, **BARE))
    assert ar.cpu_limited and ar.comm_s == pytest.approx(1.12, rel=1e-12)
    # inside nodes (ring of 8 on 4 nodes of 2): each rank sends one buffer inside its node, 8 x 40 MB = 320 MB
    # at 0.32 GB/s = 1 s; the 8 buffers that cross nodes go at the exchange rate: 320 MB / 3.2 GB/s = 0.1 s
    intra = cost(ring(8), 8, 2, Links(GBIT, cpu_bytes_per_s=3.2e9, cpu_intra_bytes_per_s=0.32e9, **BARE))
    assert intra.cpu_limited and intra.comm_s == pytest.approx(1.1, rel=1e-12)


def test_allreduce_has_its_own_overlap_share():
    # all-reduce over 8: 70 MB per NIC = 0.5855 s on the links, 560 MB at 1 GB/s = 0.56 s on the cores;
    # with shares 0.1 for exchanges and 0.5 for all-reduces, 0.5855 + 0.5 x 0.56
    links = Links(GBIT, cpu_bytes_per_s=1e9, cpu_serial_fraction=0.1, cpu_allreduce_serial_fraction=0.5, **BARE)
    ar = cost(complete(8), 8, 1, links)
    assert not ar.cpu_limited and ar.comm_s == pytest.approx(70e6 / B + 0.28, rel=1e-12)
    # an exchange keeps the exchange share: ring of 8, 640 MB at 1 GB/s beside 0.669 s on the links
    x = cost(ring(8), 8, 1, links)
    assert x.comm_s == pytest.approx(80e6 / B + 0.1 * 0.64, rel=1e-12)
    # None: the exchange share for both
    same = cost(complete(8), 8, 1, Links(GBIT, cpu_bytes_per_s=1e9, cpu_serial_fraction=0.1, **BARE))
    assert same.comm_s == pytest.approx(70e6 / B + 0.056, rel=1e-12)


def test_combine_bytes_and_time():
    # ring: receiver reads itself and 2 received buffers and writes itself: (3 + 1) x 40 MB at 16 GB/s = 10 ms
    plan = compile_plan(ring(8), tuple(range(8)), 0)
    assert rank_traffic(plan, MB40).combine_bytes == 4 * MB40
    c = cost(ring(8), 8, 1, Links(GBIT, op_overhead_s=0.0, memory_bytes_per_s=16e9))
    assert c.combine_s == pytest.approx(0.01) and c.mix_s == pytest.approx(80e6 / B + 0.01)


def test_time_varying_schedules_average_over_the_period():
    # one-peer exponential on 8: 3 phases, each one send and one receive of 40 MB per rank
    c = cost([p.matrix for p in one_peer_exponential(8)], 8, 1, Links(GBIT, **BARE))
    assert c.period == 3 and c.comm_s == pytest.approx(MB40 / B)
    # local SGD, tau = 4: three identity steps, then an all-reduce; per step a quarter of it
    n = 8
    s = Schedule([Phase(np.eye(n), 3), Phase(complete(n), 1)])
    lc = schedule_cost(s, tuple(range(n)), MB40, Links(GBIT, **BARE))
    assert lc.comm_s == pytest.approx(ring_allreduce_time(MB40, 8, B) / 4)
    assert lc.phases[0].comm_s.tolist() == [0.0] * n


def test_symmetry_shortcut_gives_what_compiling_every_rank_gives():
    for P in (
        exponential(16),
        ring(12),
        complete(8),
        hierarchical(4, 4)[0].matrix,
        hierarchical(4, 4)[1].matrix,
        torus(3, 4),
    ):
        fast = traffic_of_phase(P, tuple(range(P.shape[0])), 1000)
        full = [rank_traffic(compile_plan(P, tuple(range(P.shape[0])), r), 1000) for r in range(P.shape[0])]
        assert fast == full


def test_step_times_blocking_and_overlapped():
    assert step_times(0.12, 0.05, 0.01) == pytest.approx((0.18, 0.13))
    assert step_times(0.02, 0.05, 0.01) == pytest.approx((0.08, 0.06))


def test_overlapped_step_without_contention_is_the_longer_of_compute_and_comm_plus_combine():
    assert overlapped_step_time(0.12, 0.05, 0.01) == pytest.approx(0.13)
    assert overlapped_step_time(0.02, 0.05, 0.01) == pytest.approx(0.06)
    assert step_times(0.12, 0.05, 0.01, 0.0)[1] == overlapped_step_time(0.12, 0.05, 0.01)


def test_contention_slows_the_compute_by_the_traffic_it_runs_beside():
    # compute 0.30 s, traffic 0.29 s that takes 0.12 s of CPU from the compute: the compute ends last
    assert overlapped_step_time(0.30, 0.29, 0.02, 0.12) == pytest.approx(0.44)
    assert step_times(0.30, 0.29, 0.02, 0.12) == pytest.approx((0.61, 0.44))
    # traffic of 0.6 s beside a compute of 0.35 s taking 0.24 s of CPU: compute' = 0.35 / (1 - 0.24 / 0.6)
    # = 0.583 s (it loses 0.4 of the CPU while the traffic runs) ends before the traffic, which decides
    slowed = 0.35 / (1 - 0.24 / 0.6)
    assert slowed == pytest.approx(0.35 + 0.24 * slowed / 0.6) and slowed < 0.6
    assert overlapped_step_time(0.35, 0.6, 0.01, 0.24) == pytest.approx(0.61)
    # the boundary: compute + contention = comm
    assert overlapped_step_time(0.36, 0.6, 0.0, 0.24) == pytest.approx(0.6)
    with pytest.raises(ConfigError, match="contention_s"):
        overlapped_step_time(0.1, 0.1, 0.0, math.nan)
    with pytest.raises(ConfigError, match="compute_s"):
        overlapped_step_time(-0.1, 0.1)
    with pytest.raises(ConfigError, match="comm_s"):
        overlapped_step_time(0.1, math.inf)


def test_total_bytes_is_every_rank_s_traffic_per_step():
    # ring on 8 ranks: each sends 40 MB to both neighbours
    assert cost(ring(8), 8, 1, Links(GBIT)).total_bytes == 8 * 80e6
    # one-peer exponential: hops 1 and 2 send one buffer each; hop 4 is four 2-rank all-reduces,
    # each rank sending 2 (2 - 1) / 2 of the buffer
    c = cost(one_peer_exponential(8), 8, 1, Links(GBIT))
    assert [float(np.sum(p.bytes_sent)) for p in c.phases] == [8 * MB40] * 3
    assert c.total_bytes == 8 * MB40
    assert c.total_bytes >= c.bytes_per_rank


def test_steps_to_consensus():
    assert steps_to_consensus(0.5, 1e-3) == 10  # 0.5^10 = 9.8e-4
    assert steps_to_consensus(0.1, 1e-3) == 3
    assert steps_to_consensus(0.0, 1e-3, period=3, period_rate=0.0) == 3
    assert steps_to_consensus(0.3, 1e-3, period=12, period_rate=0.0) == 12
    assert math.isinf(steps_to_consensus(1.0))


def test_bad_input_names_the_argument():
    with pytest.raises(ConfigError, match="bandwidth_bits"):
        Links(0)
    with pytest.raises(ConfigError, match="allreduce"):
        Links(GBIT, allreduce="tree")
    with pytest.raises(ConfigError, match="cpu_serial_fraction"):
        Links(GBIT, cpu_serial_fraction=1.5)
    with pytest.raises(ConfigError, match="cpu_allreduce_serial_fraction"):
        Links(GBIT, cpu_allreduce_serial_fraction=-0.1)
    with pytest.raises(ConfigError, match="eps"):
        steps_to_consensus(0.5, 2.0)
    with pytest.raises(ConfigError, match="ranks_per_node"):
        cost(ring(8), 8, 3, Links(GBIT))


def test_concurrent_allreduces_leaving_one_node_share_its_nic():
    # one-peer exponential's last hop on 8 ranks pairs r with r + 4: compiled as four 2-rank all-reduces;
    # on 4 nodes of 2, node 0's ranks 0 and 1 both reduce with node 2: 2 x (2 x 1/2 x 40 MB) leave node 0
    P = one_peer_exponential(8)[2].matrix
    assert compile_plan(P, tuple(range(8)), 0).allreduces[0].ranks == (0, 4)
    c = cost(P, 8, 2, Links(GBIT, **BARE))
    assert c.comm_s == pytest.approx(2 * MB40 / B, rel=1e-12)
    one = cost(P, 8, 1, Links(GBIT, **BARE))  # one rank per node: each NIC carries one group's ring
    assert one.comm_s == pytest.approx(MB40 / B, rel=1e-12)


# -- the array form against the per-rank computation it replaced -------------------------------------


def _reference_allreduce_shape(group, nbytes, rpn, links):
    p = len(group)
    nodes: dict[int, int] = {}
    for r in group:
        nodes[r // rpn] = nodes.get(r // rpn, 0) + 1
    m, c = len(nodes), max(nodes.values())
    if m == 1:
        return {}, ring_allreduce_time(nbytes, p, links.intra_bytes_per_s, links.op_overhead_s)
    algo = links.allreduce
    if algo == "auto":
        algo = "hierarchical" if c > 1 else "ring"
    if algo == "hierarchical":
        per_node = 2 * (m - 1) / m * nbytes
        rest = ring_allreduce_time(nbytes, c, links.intra_bytes_per_s, links.op_overhead_s) + 2 * (m - 1) * (
            links.latency_s + links.op_overhead_s
        )
        return {u: per_node for u in nodes}, rest
    load: dict[int, float] = {}
    for a, b in zip(group, group[1:] + group[:1]):
        if a // rpn != b // rpn:
            load[a // rpn] = load.get(a // rpn, 0.0) + 2 * (p - 1) / p * nbytes
    return load, 2 * (p - 1) * (links.latency_s + links.op_overhead_s)


def _reference_phase_cost(traffic, buffer_bytes, rpn, links):
    """The cost model's formulas evaluated rank by rank, one Python object per rank."""
    world = len(traffic)
    nnodes = -(-world // rpn)
    egress, ingress = np.zeros(nnodes), np.zeros(nnodes)
    intra_sent, total_bytes, ar_bytes, intra_bytes = np.zeros(world), 0.0, 0.0, 0.0
    senders: list[set] = [set() for _ in range(world)]
    B_ = links.inter_bytes_per_s
    for t in traffic:
        u = t.rank // rpn
        for peer, b in t.sends:
            if peer // rpn != u:
                total_bytes += b
                egress[u] += b
                ingress[peer // rpn] += b
                senders[peer].add(u)
            else:
                intra_bytes += b
                intra_sent[t.rank] += b
    comm, combine, sent = np.zeros(world), np.zeros(world), np.zeros(world)
    shapes: dict = {}
    for g in (g for t in traffic for g in t.allreduces):
        if g not in shapes:
            shapes[g] = _reference_allreduce_shape(g, buffer_bytes, rpn, links)
    ar_load = np.zeros(nnodes)
    for load, _ in shapes.values():
        for u, b in load.items():
            ar_load[u] += b
    done = {g: max((ar_load[u] for u in load), default=0.0) / B_ + rest for g, (load, rest) in shapes.items()}
    for g, (load, _) in shapes.items():
        if load:
            ar_bytes += 2 * (len(g) - 1) * buffer_bytes
        else:
            intra_bytes += 2 * (len(g) - 1) * buffer_bytes
    for t in traffic:
        u = t.rank // rpn
        for g in t.allreduces:
            comm[t.rank] += done[g]
            sent[t.rank] += 2 * (len(g) - 1) * buffer_bytes // len(g)
        if t.sends or t.recvs:
            inter = max([egress[u], ingress[u]] + [egress[v] for v in senders[t.rank]]) / B_
            intra = intra_sent[t.rank] / links.intra_bytes_per_s
            crosses = any(p // rpn != u for p, _ in t.sends + t.recvs)
            comm[t.rank] += (
                max(inter, intra)
                + (links.latency_s if crosses else 0.0)
                + links.op_overhead_s * (len(t.sends) + len(t.recvs))
            )
        sent[t.rank] += sum(b for _, b in t.sends)
        combine[t.rank] = t.combine_bytes / links.memory_bytes_per_s
    cpu_limited = cpu_term_(comm, total_bytes, ar_bytes, intra_bytes, links)  # the same scalar rule
    return comm, combine, sent, egress, cpu_limited


def _random_phase(n, seed, density=0.3):
    rng = np.random.default_rng(seed)
    M = (rng.random((n, n)) < density) * rng.random((n, n)) + np.eye(n) * 0.1
    return Phase(sp.csc_array(M / M.sum(axis=0)))


def _equivalence_cases():
    from lookahead_dist.phase import Averaging
    from lookahead_dist.topology import load

    one = lambda n: tuple(range(n))  # noqa: E731
    cases = [
        ("ring", Phase(ring(12)), one(12)),
        ("torus", Phase(torus(3, 4), shape=(3, 4)), one(12)),
        ("complete", Phase(Averaging(1, 16)), one(16)),
        ("exponential", Phase(exponential(16)), one(16)),
        ("random edges", _random_phase(10, 0), one(10)),
        ("ring, 3 agents per rank", Phase(ring(12)), tuple(r // 3 for r in range(12))),
        ("complete, agents dealt round", Phase(Averaging(1, 12)), tuple(r % 4 for r in range(12))),
        ("two averaging groups on the same ranks", Phase(Averaging(1, 4, 2)), tuple(r // 2 for r in range(8))),
        ("random edges, random placement", _random_phase(12, 1, 0.2), (0, 2, 1, 1, 3, 0, 2, 3, 3, 1, 0, 2)),
    ]
    cases += [(f"one-peer exponential {k}", ph, one(16)) for k, ph in enumerate(one_peer_exponential(16))]
    cases += [(f"hierarchical {k}", ph, one(12)) for k, ph in enumerate(hierarchical(3, 4, "exponential"))]
    cases += [(f"hierarchical 4x2 {k}", ph, (0, 1, 0, 1, 2, 3, 2, 3)) for k, ph in enumerate(hierarchical(4, 2))]
    for f in ("directed_push_sum", "slow_agent_own_rank", "two_agent"):
        t = load(f"topologies/{f}.yaml")
        cases += [(f"{f} {k}", ph, t.placement) for k, ph in enumerate(t.schedule.phases) if not ph.is_identity]
    return cases


EQUIV_LINKS = [
    Links(GBIT, **BARE),
    Links(GBIT, latency_s=1e-4, op_overhead_s=2e-4, intra_bandwidth_bits=8e9, memory_bytes_per_s=16e9),
    Links(GBIT, latency_s=5e-6, allreduce="ring", cpu_bytes_per_s=1e9, cpu_serial_fraction=0.3),
    Links(
        GBIT,
        allreduce="hierarchical",
        cpu_bytes_per_s=2e9,
        cpu_allreduce_bytes_per_s=0.7e9,
        cpu_intra_bytes_per_s=0.3e9,
        cpu_serial_fraction=0.1,
        cpu_allreduce_serial_fraction=0.6,
    ),
]


@pytest.mark.parametrize("name, ph, placement", _equivalence_cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_array_traffic_and_cost_equal_the_per_rank_computation(name, ph, placement):
    world = max(placement) + 1
    nbytes = 1_000_003
    per_rank = [rank_traffic(compile_plan(ph, placement, r), nbytes) for r in range(world)]
    arrays = phase_traffic(ph, placement, nbytes)
    assert arrays.ranks() == per_rank  # the same messages, groups and combine bytes as the compiled plans
    listed = PhaseTraffic.from_ranks(per_rank)
    for field in ("send_src", "send_dst", "send_bytes", "recv_rank", "recv_peer", "combine_bytes", "member_rank"):
        assert np.array_equal(getattr(arrays, field), getattr(listed, field)), field
    groups = [arrays.group(g) for g in arrays.member_group.tolist()]
    assert groups == [listed.group(g) for g in listed.member_group.tolist()]
    for rpn in [d for d in (1, 2, 3, 4) if world % d == 0]:
        for links in EQUIV_LINKS:
            want = _reference_phase_cost(per_rank, nbytes, rpn, links)
            for got in (phase_cost(arrays, nbytes, rpn, links), phase_cost(per_rank, nbytes, rpn, links)):
                have = (got.comm_s, got.combine_s, got.bytes_sent, got.node_egress, got.cpu_limited)
                for a, b in zip(have[:4], want[:4]):
                    np.testing.assert_array_equal(a, b)  # the same arithmetic, in the same order
                assert have[4] == want[4]


def test_schedule_cost_reads_the_phase_without_compiling_plans(monkeypatch):
    # 65,536 ranks of one-peer exponential's first hop: O(n) arrays, no per-rank plan
    import lookahead_dist.traffic as traffic

    monkeypatch.setattr(traffic, "compile_plan", None)
    n = 65_536
    c = schedule_cost(Schedule([one_peer_exponential(n)[0]]), range(n), MB40, Links(GBIT, **BARE), 8)
    # every node sends one 40 MB buffer out (its last rank's) and takes one in
    assert c.comm_s == pytest.approx(MB40 / B, rel=1e-12) and c.bytes_per_rank == MB40
    assert c.phases[0].node_egress.shape == (n // 8,) and np.all(c.phases[0].node_egress == MB40)
