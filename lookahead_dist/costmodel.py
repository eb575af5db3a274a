"""A network cost model: predicted communication and step time of a mixing schedule on a cluster of nodes.

From what every rank sends, all-reduces and combines in each phase (the
messages of the plans :func:`lookahead_dist.plan.compile_plan` would compile,
derived as arrays from the phase's stored entries by
:func:`lookahead_dist.traffic.phase_traffic`, O(nnz), so 65,536 ranks cost
seconds), the model predicts what one step costs each rank on a cluster
of nodes, each node a NIC of ``bandwidth`` bits/s shared by its ranks (ranks
numbered node by node: rank r lives on node r // ranks_per_node):

* **Exchange** (point-to-point messages of one phase, all in flight at once).
  The bottleneck is a node's NIC: the bytes of *all* the node's outgoing
  inter-node messages (its egress) go through it one after another, and so do
  its incoming ones (ingress; a NIC is full duplex, so the two directions do
  not add up). A rank is done when its node's traffic and the traffic of every
  node that sends to it has passed::

      T_x(r) = max(max(E_u, I_u) for u = node(r), E_v for every node v sending to r) / B
               + latency + overhead x (messages sent + received by r)

  with B the usable payload bandwidth, ``bandwidth / 8 x 1448/1514`` bytes/s
  (TCP over Ethernet at MTU 1500 with timestamps: 1448 payload bytes in every
  1514 on the wire), ``latency`` the link's one-way latency (paid once: the
  messages travel at the same time) and ``overhead`` the per-operation cost of
  the communication library (gloo: 0.1-0.5 ms here, :data:`GLOO_OP_OVERHEAD_S`,
  measured). Messages between ranks of one node go at ``intra_bandwidth``
  (NVLink, or the kernel's loopback on the emulated cluster) in parallel with
  the NIC.
* **All-reduce** over p ranks, as a ring (Patarasuk & Yuan, "Bandwidth optimal
  all-reduce algorithms for clusters of workstations", JPDC 69(2), 2009;
  Thakur, Rabenseifner & Gropp, "Optimization of collective communication
  operations in MPICH", IJHPCA 19(1), 2005, the alpha-beta cost
  2 (p - 1) alpha + 2 (p - 1)/p n beta of reduce-scatter + all-gather)::

      T_ring = 2 (p - 1) / p x bytes / B x h + 2 (p - 1) x (latency + overhead)

  where h is the largest number of ring hops that leave one node (1 when the
  ranks of each node are consecutive in the ring, as with the ranks numbered
  node by node); this is what gloo runs. ``hierarchical`` (when ranks share
  nodes, as NCCL does): a reduce-scatter and an all-gather inside each node of
  c ranks at ``intra_bandwidth`` around a ring across the m nodes::

      T_hier = 2 (m - 1) / m x bytes / B + 2 (m - 1) x (latency + overhead)
               + 2 (c - 1) / c x bytes / B_intra + 2 (c - 1) x overhead

* **CPU term.** On the emulated cluster every node shares the machine's cores,
  which move at most ``cpu_bytes_per_s`` bytes of point-to-point messages per
  second in all (2 idle cores: about 16 Gbit/s), ``cpu_allreduce_bytes_per_s``
  of all-reduce traffic (2 (p - 1) x bytes per all-reduce over p ranks; each
  byte is also summed) and ``cpu_intra_bytes_per_s`` of traffic inside a node
  (messages and all-reduces over loopback, which skip the shaper and the
  bridge). A phase then takes at least its bytes over these rates; when that is the
  larger term the phase is reported as CPU-limited. The two do not overlap
  completely (copies into and out of the sockets at a message's start and end,
  and tokens the shaper loses while the cores are busy elsewhere), so a phase
  takes max(T_link, T_cpu) + s x min(T_link, T_cpu), s =
  ``cpu_serial_fraction``. An all-reduce has a share of its own,
  ``cpu_allreduce_serial_fraction`` (None: the same): a ring all-reduce runs
  2 (p - 1) steps that each wait for the slowest process, so its link and CPU
  costs serialize more than the flows of an exchange, each at its own pace. A
  phase with both kinds of traffic uses the two shares weighted by their CPU
  times. The rates are measured (the bench times an unshaped
  ring, an unshaped all-reduce), and so is the exchange share (a shaped ring); None (the default) means a
  real cluster, where each node's own CPUs drive its NIC.
* **Combine.** The weighted sum after an exchange reads every source and the
  receiver's own buffer and writes it; after an all-reduce the weighted input
  is read and written and the result copied to every receiver. Its bytes over
  ``memory_bytes_per_s``.
* **Step time.** blocking = compute + communication + combine (the
  communication waits for the backward pass, the next forward waits for it);
  overlapped = max(compute, communication) + combine (communication runs
  behind the forward and backward pass, the combine cannot). Where compute
  and communication share the cores (the emulated cluster), the compute
  also loses the CPU time of the traffic that runs beside it: a measured
  contention term, seconds per byte of the step's traffic
  (:func:`overlapped_step_time`; bench/overlap.py measures it).
* **Consensus.** With per-step consensus rate rho (the spectral radius of the
  period product minus a 1^T, to the power 1/period), the consensus distance
  shrinks like rho^k: reaching eps takes ceil(log eps / log rho) steps; a
  schedule whose period product is the exact average (rate 0) reaches it in one
  period.

Assumptions, beyond the formulas: all ranks start a phase at once (a
synchronous step) and the slowest rank is the step; the phases of a rank run
one after the other (all-reduces, then the exchange, as the engine runs them);
the all-reduces of one phase run at once, and those whose rings leave the
same node add up on its NIC (e.g. one-peer exponential's pairwise hop n/2,
compiled as 2-rank all-reduces); TCP
reaches the shaped rate (messages much longer than the token bucket's burst);
inter-node messages of different nodes do not meet in the network core (a
non-blocking switch). Pure NumPy; no process is started.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lookahead_dist.errors import ConfigError
from lookahead_dist.mixing import Schedule
from lookahead_dist.traffic import PhaseTraffic, RankTraffic, _unique, phase_traffic, rank_traffic, traffic_of_phase

__all__ = [
    "GLOO_OP_OVERHEAD_S",
    "WIRE_FRACTION",
    "Links",
    "RankTraffic",
    "PhaseCost",
    "ScheduleCost",
    "usable_bandwidth",
    "ring_allreduce_time",
    "hierarchical_allreduce_time",
    "PhaseTraffic",
    "rank_traffic",
    "traffic_of_phase",
    "phase_traffic",
    "phase_cost",
    "schedule_cost",
    "step_times",
    "overlapped_step_time",
    "steps_to_consensus",
]

WIRE_FRACTION = 1448 / 1514  # TCP payload per byte on the wire, MTU 1500, TCP timestamps on
# gloo's cost per point-to-point operation or ring step, measured with 2 ranks on this machine's loopback
# (1 KiB exchanges: 0.19-0.21 ms; a 2-rank all-reduce, 2 ring steps: 0.33 ms)
GLOO_OP_OVERHEAD_S = 2.0e-4
ALGORITHMS = ("auto", "ring", "hierarchical")


@dataclass(frozen=True)
class Links:
    """The cluster's links and machines (rates in bits/s, times in s, memory in bytes/s).

    ``allreduce``: "ring" (a flat ring over the group's ranks, what gloo runs),
    "hierarchical" (inside nodes, then a ring across nodes, then inside nodes),
    or "auto" (hierarchical when a group has more than one rank on some node
    and spans more than one node, else ring).
    """

    bandwidth_bits: float
    latency_s: float = 0.0
    intra_bandwidth_bits: float = 800e9  # NVLink-class default; the emulated cluster's loopback is far slower
    op_overhead_s: float = GLOO_OP_OVERHEAD_S
    cpu_bytes_per_s: float | None = None
    cpu_allreduce_bytes_per_s: float | None = None  # None: cpu_bytes_per_s
    cpu_intra_bytes_per_s: float | None = None  # None: cpu_bytes_per_s
    cpu_serial_fraction: float = 0.0  # the share of the smaller of the link and CPU terms that adds to the larger
    cpu_allreduce_serial_fraction: float | None = None  # the same for all-reduce traffic; None: cpu_serial_fraction
    memory_bytes_per_s: float = 20e9
    wire_fraction: float = WIRE_FRACTION
    allreduce: str = "auto"

    def __post_init__(self):
        for name in ("bandwidth_bits", "intra_bandwidth_bits", "memory_bytes_per_s", "wire_fraction"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ConfigError(f"Links.{name}: must be a positive finite number, got {v!r}")
        for name in ("latency_s", "op_overhead_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise ConfigError(f"Links.{name}: must be a finite number >= 0, got {v!r}")
        for name in ("cpu_bytes_per_s", "cpu_allreduce_bytes_per_s", "cpu_intra_bytes_per_s"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v > 0):
                raise ConfigError(f"Links.{name}: must be positive or None, got {v!r}")
        for name in ("cpu_serial_fraction", "cpu_allreduce_serial_fraction"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and 0 <= v <= 1):
                raise ConfigError(f"Links.{name}: must be in [0, 1], got {v!r}")
        if self.wire_fraction > 1:
            raise ConfigError(f"Links.wire_fraction: must be in (0, 1], got {self.wire_fraction!r}")
        if self.allreduce not in ALGORITHMS:
            raise ConfigError(f"Links.allreduce: must be one of {list(ALGORITHMS)}, got {self.allreduce!r}")

    @property
    def inter_bytes_per_s(self) -> float:
        return usable_bandwidth(self.bandwidth_bits, self.wire_fraction)

    @property
    def intra_bytes_per_s(self) -> float:
        return self.intra_bandwidth_bits / 8


def usable_bandwidth(rate_bits: float, wire_fraction: float = WIRE_FRACTION) -> float:
    """Payload bytes per second through a link of ``rate_bits``: rate / 8 x 1448/1514 for TCP at MTU 1500."""
    return rate_bits / 8 * wire_fraction


def ring_allreduce_time(
    nbytes: float, p: int, bytes_per_s: float, step_latency_s: float = 0.0, hops_per_link: int = 1
) -> float:
    """2 (p - 1)/p x nbytes / bytes_per_s x hops_per_link + 2 (p - 1) x step_latency_s; 0 for p = 1."""
    if p <= 1:
        return 0.0
    return 2 * (p - 1) / p * nbytes / bytes_per_s * hops_per_link + 2 * (p - 1) * step_latency_s


def hierarchical_allreduce_time(nbytes: float, nodes: int, per_node: int, links: Links) -> float:
    """Inside each node (c = per_node ranks) at intra bandwidth, a ring across ``nodes`` at the NIC's."""
    inter = ring_allreduce_time(nbytes, nodes, links.inter_bytes_per_s, links.latency_s + links.op_overhead_s)
    intra = ring_allreduce_time(nbytes, per_node, links.intra_bytes_per_s, links.op_overhead_s)
    return inter + intra


@dataclass
class PhaseCost:
    """The predicted cost of one phase on every rank (arrays indexed by rank, seconds and bytes)."""

    comm_s: np.ndarray  # communication: all-reduces then the exchange
    combine_s: np.ndarray
    bytes_sent: np.ndarray  # point to point, plus 2 (p - 1)/p x buffer per all-reduce
    node_egress: np.ndarray  # inter-node bytes leaving each node
    cpu_limited: bool = False

    @property
    def time_s(self) -> float:
        """The phase's duration: its slowest rank's communication plus combine."""
        return float(np.max(self.comm_s + self.combine_s)) if len(self.comm_s) else 0.0


def _ring_times(nbytes: int, p: np.ndarray, bytes_per_s: float, step_latency_s: float) -> np.ndarray:
    """:func:`ring_allreduce_time` of every entry of ``p`` (one hop per link), in the same arithmetic."""
    return np.where(p > 1, 2 * (p - 1) / np.maximum(p, 1) * nbytes / bytes_per_s + 2 * (p - 1) * step_latency_s, 0.0)


def _allreduce_loads(t: PhaseTraffic, nbytes: int, rpn: int, nnodes: int, links: Links):
    """For every distinct all-reduce group of ``t``: (its node loads: group, node, bytes; time outside the NICs;
    does it leave one node). A ring in the group's order puts 2 (p - 1)/p x bytes on the node each hop leaves;
    a hierarchical one 2 (m - 1)/m x bytes on each of its m nodes."""
    ptr = t.group_ptr
    G = ptr.size - 1
    p = np.diff(ptr)
    gid = np.repeat(np.arange(G), p)
    node = t.group_ranks // rpn
    pairs, per = _unique(gid * nnodes + node, counts=True)  # (group, node) with its ranks
    pg, pn = pairs // nnodes, pairs % nnodes
    m = np.bincount(pg, minlength=G)
    c = np.zeros(G, dtype=np.int64)
    np.maximum.at(c, pg, per)
    spans = m > 1
    hier = (c > 1) if links.allreduce == "auto" else np.full(G, links.allreduce == "hierarchical")
    hier &= spans
    step = links.latency_s + links.op_overhead_s
    rest = np.where(
        spans,
        np.where(hier, _ring_times(nbytes, c, links.intra_bytes_per_s, links.op_overhead_s) + 2 * (m - 1) * step, 0.0),
        _ring_times(nbytes, p, links.intra_bytes_per_s, links.op_overhead_s),
    )
    rest = np.where(spans & ~hier, 2 * (p - 1) * step, rest)
    # hierarchical: every node of the group; ring: the node each crossing hop leaves, hop by hop
    keep = hier[pg]
    load_g, load_n = [pg[keep]], [pn[keep]]
    load_b = [(2 * (m - 1) / np.maximum(m, 1) * nbytes)[pg[keep]]]
    nxt = np.arange(gid.size) + 1
    nxt[ptr[1:][p > 0] - 1] = ptr[:-1][p > 0]  # the ring closes on the group's first rank
    hop = (node != node[nxt]) & (spans & ~hier)[gid]
    if np.any(hop):
        key = gid[hop] * nnodes + node[hop]
        k = _unique(key)
        b = np.zeros(k.size)
        np.add.at(b, np.searchsorted(k, key), (2 * (p - 1) / np.maximum(p, 1) * nbytes)[gid[hop]])
        load_g.append(k // nnodes), load_n.append(k % nnodes), load_b.append(b)
    lg, ln, lb = np.concatenate(load_g), np.concatenate(load_n), np.concatenate(load_b)
    order = np.argsort(lg, kind="stable")  # groups add to the NICs in their order
    return (lg[order], ln[order], lb[order]), rest, spans


def cpu_term_(comm: np.ndarray, total_bytes: float, ar_bytes: float, intra_bytes: float, links: Links) -> bool:
    """In place: every active rank's communication time with the CPU term (the cores that move the phase's
    inter-node, all-reduce and intra-node bytes; the share that does not overlap the links). True when the
    cores, not the links, are the limit."""
    if links.cpu_bytes_per_s is None or not (total_bytes or ar_bytes or intra_bytes):
        return False
    cpu_ar = ar_bytes / (links.cpu_allreduce_bytes_per_s or links.cpu_bytes_per_s)
    cpu_s = (
        total_bytes / links.cpu_bytes_per_s
        + cpu_ar
        + intra_bytes / (links.cpu_intra_bytes_per_s or links.cpu_bytes_per_s)
    )
    s_ar = links.cpu_allreduce_serial_fraction
    s_ar = links.cpu_serial_fraction if s_ar is None else s_ar
    share = links.cpu_serial_fraction + (s_ar - links.cpu_serial_fraction) * cpu_ar / cpu_s
    active = comm > 0
    cpu_limited = bool(np.any(comm[active] < cpu_s))
    big, small = np.maximum(comm[active], cpu_s), np.minimum(comm[active], cpu_s)
    comm[active] = big + share * small
    return cpu_limited


def phase_cost(
    traffic: PhaseTraffic | list[RankTraffic], buffer_bytes: int, ranks_per_node: int, links: Links
) -> PhaseCost:
    """The predicted cost of one phase from every rank's traffic (see the module's formulas).

    ``traffic`` is a :class:`~lookahead_dist.traffic.PhaseTraffic` (:func:`phase_traffic`) or a list of
    :class:`RankTraffic`, rank r at position r. O(messages + group members) numpy work.
    """
    t = traffic if isinstance(traffic, PhaseTraffic) else PhaseTraffic.from_ranks(traffic)
    world, rpn = t.world, ranks_per_node
    nnodes = -(-world // rpn)
    B = links.inter_bytes_per_s
    src, dst, nb = t.send_src, t.send_dst, t.send_bytes
    su, sv = src // rpn, dst // rpn
    out = su != sv
    egress = np.bincount(su[out], weights=nb[out], minlength=nnodes).astype(np.float64)
    ingress = np.bincount(sv[out], weights=nb[out], minlength=nnodes).astype(np.float64)
    intra_sent = np.bincount(src[~out], weights=nb[~out], minlength=world).astype(np.float64)
    total_bytes, intra_bytes = float(np.sum(nb[out])), float(np.sum(nb[~out]))
    # all-reduces of one phase run at once: groups that share a node share its NIC
    (lg, ln, lb), rest, spans = _allreduce_loads(t, buffer_bytes, rpn, nnodes, links)
    ar_load = np.zeros(nnodes)
    np.add.at(ar_load, ln, lb)
    worst = np.zeros(rest.size)
    np.maximum.at(worst, lg, ar_load[ln])
    done = worst / B + rest
    p = np.diff(t.group_ptr)
    moved = 2 * (p - 1) * buffer_bytes
    ar_bytes, intra_bytes = float(np.sum(moved[spans])), intra_bytes + float(np.sum(moved[~spans]))
    comm, sent = np.zeros(world), np.zeros(world)
    np.add.at(comm, t.member_rank, done[t.member_group])
    np.add.at(sent, t.member_rank, (moved // np.maximum(p, 1))[t.member_group])
    sent += np.bincount(src, weights=nb, minlength=world)
    msgs = np.bincount(src, minlength=world) + np.bincount(t.recv_rank, minlength=world)
    ranks_node = np.arange(world) // rpn
    worst_in = np.maximum(egress, ingress)[ranks_node]
    np.maximum.at(worst_in, dst[out], egress[su[out]])
    crosses = np.zeros(world, dtype=bool)
    crosses[src[out]] = True
    crosses[t.recv_rank[t.recv_peer // rpn != t.recv_rank // rpn]] = True
    term = (
        np.maximum(worst_in / B, intra_sent / links.intra_bytes_per_s)
        + np.where(crosses, links.latency_s, 0.0)
        + links.op_overhead_s * msgs
    )
    ex = msgs > 0
    comm[ex] += term[ex]
    combine = t.combine_bytes / links.memory_bytes_per_s
    cpu_limited = cpu_term_(comm, total_bytes, ar_bytes, intra_bytes, links)
    return PhaseCost(comm, combine, sent, egress, cpu_limited)


@dataclass
class ScheduleCost:
    """Per-phase costs of a schedule, and their average per step (phases weighted by their repeats)."""

    phases: list[PhaseCost]
    repeats: list[int]
    period: int = field(init=False)

    def __post_init__(self):
        self.period = sum(self.repeats)

    def _mean(self, f) -> float:
        return sum(r * f(p) for p, r in zip(self.phases, self.repeats)) / self.period

    @property
    def comm_s(self) -> float:
        """Mean communication time per step of the slowest rank."""
        return self._mean(lambda p: float(np.max(p.comm_s)) if len(p.comm_s) else 0.0)

    @property
    def combine_s(self) -> float:
        return self._mean(lambda p: float(np.max(p.combine_s)) if len(p.combine_s) else 0.0)

    @property
    def mix_s(self) -> float:
        """Mean time per step of the whole mixing step (communication and combine) on the slowest rank."""
        return self._mean(lambda p: p.time_s)

    @property
    def bytes_per_rank(self) -> float:
        """Mean bytes sent per rank per step (the busiest rank)."""
        return self._mean(lambda p: float(np.max(p.bytes_sent)) if len(p.bytes_sent) else 0.0)

    @property
    def total_bytes(self) -> float:
        """Mean bytes sent per step by all ranks together: the traffic the machines' CPUs move."""
        return self._mean(lambda p: float(np.sum(p.bytes_sent)))

    @property
    def cpu_limited(self) -> bool:
        return any(p.cpu_limited for p in self.phases)


def schedule_cost(
    schedule: Schedule, placement, buffer_bytes: int, links: Links, ranks_per_node: int = 1, cache: dict | None = None
) -> ScheduleCost:
    """Predicted cost of every phase of ``schedule`` with agents of ``buffer_bytes`` placed by ``placement``."""
    if not isinstance(ranks_per_node, int) or isinstance(ranks_per_node, bool) or ranks_per_node < 1:
        raise ConfigError(f"ranks_per_node: must be an integer >= 1, got {ranks_per_node!r}")
    if not isinstance(buffer_bytes, (int, np.integer)) or buffer_bytes < 0:
        raise ConfigError(f"buffer_bytes: must be an integer >= 0, got {buffer_bytes!r}")
    placement = np.asarray(placement if isinstance(placement, np.ndarray) else list(placement), dtype=np.int64)
    world = int(placement.max()) + 1
    if world % ranks_per_node:
        raise ConfigError(f"ranks_per_node: {ranks_per_node} does not divide the {world} ranks")
    costs = []
    for ph in schedule.phases:
        if ph.is_identity:
            z = np.zeros(world)
            costs.append(PhaseCost(z, z.copy(), z.copy(), np.zeros(world // ranks_per_node)))
            continue
        traffic = phase_traffic(ph, placement, buffer_bytes, cache)
        costs.append(phase_cost(traffic, buffer_bytes, ranks_per_node, links))
    return ScheduleCost(costs, [ph.repeat for ph in schedule.phases])


def step_times(
    compute_s: float, comm_s: float, combine_s: float = 0.0, contention_s: float = 0.0
) -> tuple[float, float]:
    """(blocking, overlapped) step time: compute + comm + combine, and :func:`overlapped_step_time`
    (max(compute, comm) + combine when ``contention_s`` is 0)."""
    if not contention_s:
        return compute_s + comm_s + combine_s, max(compute_s, comm_s) + combine_s
    return compute_s + comm_s + combine_s, overlapped_step_time(compute_s, comm_s, combine_s, contention_s)


def overlapped_step_time(compute_s: float, comm_s: float, combine_s: float = 0.0, contention_s: float = 0.0) -> float:
    """The step with its communication behind the compute, on CPUs that both share::

        max(compute + contention, comm) + combine

    ``contention_s`` is the compute time that the step's whole traffic takes away from the compute
    when compute and communication share the cores (bytes x the measured seconds per byte; 0 where
    each node's NIC has CPUs of its own). The traffic runs at the links' pace over ``comm_s``, so the
    compute loses the share of it that runs while the compute does, compute' = compute + contention x
    min(1, compute' / comm): all of it when compute + contention >= comm, else a part, and the compute
    then ends before the traffic, which decides the step. The combine waits for both.
    """
    for name, v in (("compute_s", compute_s), ("comm_s", comm_s), ("combine_s", combine_s)):
        if not (v >= 0 and math.isfinite(v)):
            raise ConfigError(f"{name}: must be a finite number >= 0, got {v!r}")
    if not (contention_s >= 0 and math.isfinite(contention_s)):
        raise ConfigError(f"contention_s: must be a finite number >= 0, got {contention_s!r}")
    return max(compute_s + contention_s, comm_s) + combine_s


def steps_to_consensus(
    rate_per_step: float, eps: float = 1e-3, period: int = 1, period_rate: float | None = None
) -> float:
    """Steps until the consensus distance is below ``eps`` (relative to the start), for rate rho per step.

    ceil(log eps / log rho); ``period`` steps when the period product averages exactly (``period_rate``
    or rho below 1e-12); infinity when rho >= 1 (no consensus).
    """
    if not 0 < eps < 1:
        raise ConfigError(f"eps: the consensus distance must be in (0, 1), got {eps!r}")
    if (period_rate is not None and period_rate < 1e-12) or rate_per_step < 1e-12:
        return float(period)
    if rate_per_step >= 1:
        return math.inf
    return float(max(1, math.ceil(math.log(eps) / math.log(rate_per_step) - 1e-9)))
