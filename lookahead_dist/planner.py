"""Which topology for my cluster? Predicted cost and consensus of every built-in family, and a recommendation.

``python -m lookahead_dist.topology --plan --world-size 256 --nodes 32 --bandwidth 25gbit --latency 5us
--params 25M [--compute-ms 120]`` prints one row per family: the ring, 2-D torus, static exponential,
one-peer exponential and hierarchical graphs, exact averaging (complete), all-reduce SGD (DDP's gradient
all-reduce), local SGD and SlowMo over one-peer exponential gossip at several tau. Each row gives the bytes
a rank sends per step, the communication time per step (:mod:`lookahead_dist.costmodel` on the compiled
plans, ranks numbered node by node), the consensus rate per step, the steps and the time (at the blocking
step time) to shrink the consensus distance to 1e-3, and the step time, blocking and overlapped.

The recommendation is the family with the shortest step time (blocking, or overlapped with ``--overlap``)
among those that reach 1e-3 consensus within ``--max-consensus-steps`` steps (default 32): a bound on how
far the workers may drift apart, which is what costs accuracy (the SlowMo paper's local SGD runs average
every 12 to 48 steps).

Cost: the plans of one phase are compiled for ranks 0 .. s - 1 only, s the smallest shift that leaves
the matrix unchanged (1 for circulant graphs, the row length for the torus), and shared between rows
that use the same matrix; consensus rates of circulant (block-circulant for the torus) schedules come
from the DFT of one column, so no n x n eigendecomposition is needed. Every matrix is held sparsely
(exact averaging as one block), so 65,536 ranks take a few seconds.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from lookahead_dist.costmodel import GLOO_OP_OVERHEAD_S, Links, schedule_cost, step_times, steps_to_consensus
from lookahead_dist.errors import ConfigError, TopologyError
from lookahead_dist.generators import GENERATORS
from lookahead_dist.mixing import Phase, Schedule, circulant_spectrum

__all__ = [
    "Row",
    "plan_rows",
    "recommend",
    "format_table",
    "parse_count",
    "parse_rate",
    "parse_time",
    "consensus_rate_fast",
    "scaling_plot",
    "main",
]

TAUS = (4, 12, 48)
SLOWMO_TAUS = (12, 48)


@dataclass
class Row:
    """One family's predicted costs (seconds, bytes) and consensus."""

    name: str
    bytes_per_rank: float
    comm_s: float
    rate: float  # consensus rate per step
    steps: float  # steps to eps
    blocking_s: float
    overlapped_s: float
    cpu_limited: bool = False
    note: str = ""

    @property
    def time_to_eps_s(self) -> float:
        return self.steps * self.blocking_s


# -- parsing ---------------------------------------------------------------------------------------

_RATE = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
_COUNT = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}


def _parse(text, units: dict, name: str, example: str, default_unit: str | None = None) -> float:
    """A number with a unit (tc's spelling, SI); a bare int or float is taken in the base unit."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
        unit = m.group(2) if m else None
        if m and not unit and default_unit is not None:
            unit = default_unit
        if not m or unit not in units:
            raise ConfigError(f"{name}: {text!r} is not understood; write e.g. {example} (units: {', '.join(units)})")
        value = float(m.group(1)) * units[unit]
    if not math.isfinite(value):
        raise ConfigError(f"{name}: must be finite, got {text!r}")
    return value


def parse_rate(text, name: str = "--bandwidth") -> float:
    """Bits per second from '25gbit', '500mbit' (SI, as tc writes them; not tc's 'bps'), or a number."""
    value = _parse(text, _RATE, name, "'25gbit' or '500mbit'")
    if value <= 0:
        raise ConfigError(f"{name}: the rate must be positive, got {text!r}")
    return value


def parse_time(text, name: str = "--latency") -> float:
    """Seconds from '5us', '1ms', '0' (a bare number is seconds); never negative."""
    value = _parse(text, _TIME, name, "'5us' or '1ms'", default_unit="s")
    if value < 0:
        raise ConfigError(f"{name}: must be >= 0, got {text!r}")
    return value


def parse_count(text, name: str = "--params") -> float:
    """A count from '25M', '25.6m', '1.5G', '300k' or '1000'."""
    value = _parse(text, _COUNT, name, "'25M' or '1.5G'")
    if value < 1:
        raise ConfigError(f"{name}: must be at least 1, got {text!r}")
    return value


# -- consensus rates without eigendecompositions -----------------------------------------------------


def consensus_rate_fast(phases, shape: tuple[int, ...] | None = None) -> float:
    """The period consensus rate rho(Pi - J/n) of doubly stochastic (block-)circulant phases, by DFT.

    Circulant matrices share their eigenvectors, so the eigenvalues of the product are the products
    of the phases' eigenvalues at each frequency; frequency 0 carries the eigenvalue 1 of the average.
    Falls back to :meth:`Schedule.consensus_rate` when a phase is not circulant for ``shape``
    (:func:`lookahead_dist.mixing.circulant_spectrum` checks every stored entry, O(nnz)).
    """
    phases = [ph if isinstance(ph, Phase) else Phase(ph) for ph in phases]
    n = phases[0].n
    shape = shape or (n,)
    prod = np.ones(n, dtype=complex)
    for ph in phases:
        eig = circulant_spectrum(ph, shape)
        if eig is None:
            return Schedule(phases).consensus_rate()
        prod *= eig**ph.repeat
    return float(np.max(np.abs(prod[1:]))) if n > 1 else 0.0


# -- the rows ----------------------------------------------------------------------------------------


def _phases(name: str, n: int, **kw) -> list[Phase]:
    return GENERATORS[name].phases(n, **kw) if name != "hierarchical" else GENERATORS[name].phases(None, **kw)


def plan_rows(
    world_size: int,
    nodes: int,
    links: Links,
    params: float,
    *,
    compute_s: float = 0.0,
    bytes_per_param: int = 4,
    eps: float = 1e-3,
    taus=TAUS,
    slowmo_taus=SLOWMO_TAUS,
) -> list[Row]:
    """One :class:`Row` per family for ``world_size`` ranks on ``nodes`` nodes (ranks numbered node by node)."""
    for name, v in (("world_size", world_size), ("nodes", nodes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be an integer >= 1, got {v!r}")
    if world_size % nodes:
        raise ConfigError(f"--nodes: {nodes} nodes do not divide the world size {world_size}")
    if compute_s < 0:
        raise ConfigError(f"--compute-ms: must be >= 0, got {compute_s * 1e3!r}")
    n, rpn = world_size, world_size // nodes
    nbytes = int(round(params * bytes_per_param))
    placement = tuple(range(n))
    cache: dict = {}
    rows: list[Row] = []

    def cost(phases):
        return schedule_cost(Schedule(phases), placement, nbytes, links, rpn, cache)

    def add(name, phases, rate_period, period, note="", overlap=True):
        c = cost(phases)
        per_step = rate_period ** (1.0 / period) if rate_period > 0 else 0.0
        steps = steps_to_consensus(per_step, eps, period, rate_period)
        blocking, overlapped = step_times(compute_s, c.comm_s, c.combine_s)
        rows.append(
            Row(
                name,
                c.bytes_per_rank,
                c.comm_s,
                per_step,
                steps,
                blocking,
                overlapped if overlap else blocking,
                c.cpu_limited,
                note,
            )
        )
        return c

    for fam in ("ring", "torus", "exponential", "one_peer_exponential"):
        try:
            ph = _phases(fam, n)
        except TopologyError as exc:
            rows.append(
                Row(
                    fam,
                    math.nan,
                    math.nan,
                    math.nan,
                    math.nan,
                    math.nan,
                    math.nan,
                    note=f"not built: {getattr(exc, 'rule', exc)}",
                )
            )
            continue
        shape = None
        if fam == "torus":
            dims = GENERATORS["torus"].fill({}, n)
            shape = (dims["rows"], dims["cols"])
        add(fam.replace("one_peer_", "one-peer "), ph, consensus_rate_fast(ph, shape), sum(p.repeat for p in ph))
    for inter in ("ring", "exponential"):
        name = f"hierarchical ({inter} across nodes)"
        if rpn == 1 or (nodes < 3 and inter == "ring"):
            why = "one rank per node: the same as the graph across nodes" if rpn == 1 else "fewer than 3 nodes"
            rows.append(Row(name, *[math.nan] * 6, note=f"not built: {why}"))
            continue
        ph = _phases("hierarchical", n, nodes=nodes, per_node=rpn, inter=inter)
        W = GENERATORS[inter].phases(nodes)
        add(name, ph, consensus_rate_fast(W) if nodes > 1 else 0.0, 2)
    (J,) = GENERATORS["complete"].phases(n)  # one averaging block: one all-reduce, O(1) to hold
    add("complete (parameter all-reduce)", [Phase(J)], 0.0, 1)
    ddp = add("all-reduce SGD (DDP)", [Phase(J)], 0.0, 1, note="gradients averaged: the models never drift")
    for tau in taus:
        add(
            f"local SGD tau={tau}",
            ([Phase(sp.identity(n, format="csc"), tau - 1)] if tau > 1 else []) + [Phase(J)],
            0.0,
            tau,
            note="averages every tau steps",
            overlap=False,
        )
    base = _phases("one_peer_exponential", n)
    base_rate = consensus_rate_fast(base)
    base_period = sum(p.repeat for p in base)
    base_cost = cost(base)
    for tau in slowmo_taus:
        comm = (tau * base_cost.comm_s + ddp.comm_s) / tau
        combine = (tau * base_cost.combine_s + ddp.combine_s + 4 * nbytes / links.memory_bytes_per_s) / tau
        per_step = base_rate ** (1.0 / base_period) if base_rate > 0 else 0.0
        steps = min(float(tau), steps_to_consensus(per_step, eps, base_period, base_rate))
        blocking, overlapped = step_times(compute_s, comm, combine)
        rows.append(
            Row(
                f"SlowMo tau={tau} over one-peer exp.",
                (tau * base_cost.bytes_per_rank + ddp.bytes_per_rank) / tau,
                comm,
                per_step,
                steps,
                blocking,
                overlapped,
                base_cost.cpu_limited or ddp.cpu_limited,
                "gossip every step, exact average + slow momentum every tau",
            )
        )
    return rows


def recommend(rows: list[Row], max_consensus_steps: float = 32, overlap: bool = False) -> tuple[Row, str]:
    """The fastest step among the rows that reach consensus within ``max_consensus_steps``, and why."""
    key = (lambda r: r.overlapped_s) if overlap else (lambda r: r.blocking_s)
    ok = [r for r in rows if r.steps <= max_consensus_steps and not math.isnan(key(r))]
    if not ok:
        raise ConfigError(f"--max-consensus-steps: no family reaches consensus within {max_consensus_steps} steps")
    best = min(ok, key=key)
    kind = "overlapped" if overlap else "blocking"
    ddp = next((r for r in rows if r.name.startswith("all-reduce SGD")), None)
    why = [
        f"{best.name}: the shortest {kind} step, {key(best) * 1e3:.4g} ms, among the families that reach "
        f"1e-3 consensus within {max_consensus_steps:g} steps (it takes {best.steps:g})"
    ]
    if ddp is not None and best is not ddp:
        why.append(f"{key(ddp) / key(best):.3g}x faster per step than all-reduce SGD ({key(ddp) * 1e3:.4g} ms)")
    faster = sorted((r for r in rows if key(r) < key(best) and r not in ok), key=key)
    if faster:
        why.append(
            "faster but drifting longer: "
            + ", ".join(f"{r.name} ({key(r) * 1e3:.4g} ms, {r.steps:g} steps)" for r in faster[:3])
        )
    if best.comm_s <= 0.05 * max(best.blocking_s - best.comm_s, 1e-12):
        why.append("communication is under 5 % of the step here: the choice barely matters for speed")
    if best.cpu_limited:
        why.append("the CPU term, not the links, limits it")
    return best, "; ".join(why)


def _fmt_s(x: float) -> str:
    if math.isnan(x):
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x * 1e3:.4g} ms" if x < 10 else f"{x:.4g} s"


def format_table(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    head = (
        "| family | MB sent/rank/step | comm/step | rate/step | steps to 1e-3 | time to 1e-3 | "
        "step blocking | step overlapped |"
    )
    out = [head, "|" + "---|" * 8]
    for r in rows:
        if r.note.startswith("not built"):
            out.append(f"| {r.name} ({r.note}) | - | - | - | - | - | - | - |")
            continue
        mb = r.bytes_per_rank / 1e6
        out.append(
            f"| {r.name} | {mb:.4g} | {_fmt_s(r.comm_s)} | {r.rate:.6g} | {r.steps:g} | "
            f"{_fmt_s(r.time_to_eps_s)} | {_fmt_s(r.blocking_s)} | {_fmt_s(r.overlapped_s)} |"
        )
    return "\n".join(out)


def scaling_plot(
    path,
    sizes,
    ranks_per_node: int,
    links: Links,
    params: float,
    compute_s: float = 0.0,
    overlap: bool = False,
    title: str = "",
) -> dict[str, list[float]]:
    """Draw the predicted step time of every family against the number of ranks into a PNG; returns the series."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib.figure import Figure

    series: dict[str, list[float]] = {}
    for n in sizes:
        for r in plan_rows(n, max(1, n // ranks_per_node), links, params, compute_s=compute_s):
            series.setdefault(r.name, []).append(r.overlapped_s if overlap else r.blocking_s)
    fig = Figure(figsize=(8, 5.5))
    ax = fig.subplots()
    colors = matplotlib.colormaps["tab20"]
    series = {name: ys for name, ys in series.items() if not all(math.isnan(y) for y in ys)}
    for k, (name, ys) in enumerate(series.items()):
        ax.plot(
            sizes, ys, marker="os^vD<>ph*x+"[k % 12], label=name, linestyle="-" if k < 7 else "--", color=colors(k % 20)
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"ranks N ({ranks_per_node} per node)")
    ax.set_ylabel(f"predicted step time, {'overlapped' if overlap else 'blocking'} (s)")
    ax.set_title(title or "predicted step time per family", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return series


def build_parser(prog: str = "python -m lookahead_dist.topology --plan") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, required=True, help="number of ranks (one model replica each)")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes; ranks are numbered node by node")
    p.add_argument("--bandwidth", required=True, help="each node's NIC, e.g. 10gbit, 25gbit")
    p.add_argument("--latency", default="0", help="one-way link latency, e.g. 5us (default 0)")
    p.add_argument("--params", required=True, help="model parameters, e.g. 25M")
    p.add_argument("--bytes-per-param", type=int, default=4, help="4 for float32 (default), 2 for bf16")
    p.add_argument("--compute-ms", type=float, default=0.0, help="forward + backward time per step (default 0)")
    p.add_argument("--intra-bandwidth", default="800gbit", help="between ranks of one node (default 800gbit)")
    p.add_argument(
        "--op-overhead",
        default=f"{GLOO_OP_OVERHEAD_S * 1e6:g}us",
        help="per-operation cost of the communication library (default: gloo's, measured; NCCL's is some 10us)",
    )
    p.add_argument(
        "--memory-bandwidth",
        type=float,
        default=20.0,
        help="GB/s of the weighted combine's memory traffic (default 20; a GPU has some 1000)",
    )
    p.add_argument("--eps", type=float, default=1e-3, help="consensus distance to reach (default 1e-3)")
    p.add_argument("--max-consensus-steps", type=float, default=32, help="for the recommendation (default 32)")
    p.add_argument("--overlap", action="store_true", help="recommend by the overlapped step time")
    p.add_argument(
        "--scaling-plot",
        metavar="PNG",
        default=None,
        help="also draw the step time of every family for N = 8, 16, ... up to --world-size ranks "
        "(same ranks per node)",
    )
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        links = Links(
            parse_rate(args.bandwidth),
            latency_s=parse_time(args.latency),
            intra_bandwidth_bits=parse_rate(args.intra_bandwidth, "--intra-bandwidth"),
            op_overhead_s=parse_time(args.op_overhead, "--op-overhead"),
            memory_bytes_per_s=args.memory_bandwidth * 1e9,
        )
        params = parse_count(args.params)
        rows = plan_rows(
            args.world_size,
            args.nodes,
            links,
            params,
            compute_s=args.compute_ms / 1e3,
            bytes_per_param=args.bytes_per_param,
            eps=args.eps,
        )
        best, why = recommend(rows, args.max_consensus_steps, args.overlap)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{args.world_size} ranks on {args.nodes} nodes ({args.world_size // args.nodes} per node), "
        f"{args.bandwidth} NICs, latency {args.latency}, {params / 1e6:.4g}M parameters x {args.bytes_per_param} B, "
        f"compute {args.compute_ms:g} ms per step"
    )
    print(format_table(rows))
    print(f"\nrecommended: {why}")
    if args.scaling_plot:
        rpn = args.world_size // args.nodes
        sizes = [2**k for k in range(3, 31) if rpn <= 2**k <= args.world_size]
        scaling_plot(
            args.scaling_plot,
            sizes,
            rpn,
            links,
            params,
            args.compute_ms / 1e3,
            args.overlap,
            f"{args.bandwidth} NICs, {rpn} rank(s) per node, {params / 1e6:.4g}M parameters, "
            f"compute {args.compute_ms:g} ms",
        )
        print(f"plot written to {args.scaling_plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
