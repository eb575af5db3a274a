"""The topology command line: ``python -m lookahead_dist.topology FILE [--world-size N] [--plot out.png]``.

Loads and validates a topology (:mod:`lookahead_dist.topology`), then prints
every phase, its invariant vector, its consensus rate and the messages each
rank sends (:func:`report`), and optionally draws each phase's graph
(:func:`plot`). ``lookahead_dist.topology`` keeps ``main``, ``report`` and
``plot`` as names that forward here, so the loader itself does not import the
plan compiler, networkx's drawing or matplotlib.
"""

from __future__ import annotations

import argparse
import sys

import networkx as nx
import numpy as np

from lookahead_dist.errors import MixingError, TopologyError
from lookahead_dist.mixing import consensus_rate, invariant_vector
from lookahead_dist.topology import Topology, load

__all__ = ["main", "plot", "report"]


def _vec(v) -> str:
    return "[" + ", ".join(f"{x:.6g}" for x in v) + "]"


def _matrix_text(P: np.ndarray) -> list:
    if P.shape[0] > 12:
        return ["".join("x" if x else "." for x in row) for row in P]
    return [" ".join(f"{x:7.4f}" for x in row) for row in P]


def report(t: Topology) -> str:
    """A human-readable description of a topology (what the command line prints)."""
    from lookahead_dist.plan import compile_plan, group_rank_sets

    s = t.schedule
    out = [f"{t.name}  ({t.source})"]
    if t.description:
        out.append(f"  {t.description}")
    out += [
        f"agents: {t.n} on {t.world_size} ranks; push-sum: {'yes' if t.push_sum else 'no'}; "
        f"fast: {list(t.fast_agents)}; slow: {list(t.slow_agents)}",
        f"placement (agent -> rank): {list(t.placement)}",
        f"period: {s.period} steps, {len(s.phases)} phases",
    ]
    kind = "row i = how agent i splits its mass" if t.push_sum else "column j = the weights agent j takes"
    avg, allreduces = np.zeros(t.world_size), 0
    for k, ph in enumerate(s.phases):
        P = ph.matrix
        out += [
            "",
            f"phase {k}" + (f" ({ph.name})" if ph.name else "") + f", repeat {ph.repeat}",
            f"  P ({kind}" + ("; x = non-zero)" if t.n > 12 else ")"),
        ]
        out += ["    " + line for line in _matrix_text(P)]
        M = P.T if t.push_sum else P
        try:
            a = np.full(t.n, 1.0 / t.n) if t.push_sum else invariant_vector(P)
            out.append(f"  invariant vector: {_vec(a)}")
            out.append(f"  consensus rate: {consensus_rate(M):.6g}")
        except MixingError as exc:
            out.append(f"  invariant vector: none unique ({exc}); consensus rate: 1 (no consensus in this phase)")
        sends = [len(compile_plan(P, t.placement, r).send_peers()) for r in range(t.world_size)]
        groups = group_rank_sets(P, t.placement)
        avg += ph.repeat * np.array(sends)
        if ph.is_identity:
            out.append("  messages per step: none (identity: no communication)")
        elif not groups and not any(sends):
            out.append("  messages per step: none (local arithmetic on each rank)")
        out += [f"  one all-reduce over ranks {list(g)}" for g in groups]
        allreduces += ph.repeat * len(groups)
        if any(sends):
            per_rank = (
                f"every rank: {sends[0]}"
                if len(set(sends)) == 1
                else ", ".join(f"rank {r}: {m}" for r, m in enumerate(sends)) + f" (max {max(sends)})"
            )
            out.append(f"  messages per step (distinct other ranks each rank sends to): {per_rank}")
    out += ["", f"over the period ({s.period} steps):"]
    try:
        out.append(f"  invariant vector: {_vec(s.invariant_vector())}")
    except MixingError as exc:
        out.append(f"  invariant vector: none common ({exc})")
    rate = s.consensus_rate()
    out.append(f"  period consensus rate: {rate:.6g}")
    out.append(f"  per-step rate: {s.consensus_rate(per_step=True):.6g}")
    out.append(
        "  point-to-point messages per step, averaged: "
        + ", ".join(f"rank {r}: {m / s.period:.3g}" for r, m in enumerate(avg))
        + f"; all-reduces per period: {allreduces}"
    )
    return "\n".join(out)


def plot(t: Topology, path) -> None:
    """Draw the graph of every phase (edges i -> j for P[i, j] > 0, i != j) into a PNG file."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib.figure import Figure

    phases = t.schedule.phases
    fig = Figure(figsize=(4 * len(phases), 4.2))
    axes = fig.subplots(1, len(phases), squeeze=False)[0]
    colors = ["tab:blue" if r == "fast" else "tab:orange" for r in t.roles]
    for k, (ax, ph) in enumerate(zip(axes, phases)):
        G = nx.DiGraph()
        G.add_nodes_from(range(t.n))
        G.add_edges_from((int(i), int(j)) for i, j in zip(*np.nonzero(ph.matrix)) if i != j)
        pos = nx.circular_layout(G)
        nx.draw_networkx(
            G, pos, ax=ax, node_color=colors, arrows=True, node_size=300, font_size=8, connectionstyle="arc3,rad=0.1"
        )
        ax.set_title(f"phase {k} {ph.name} (x{ph.repeat})".strip(), fontsize=9)
        ax.set_axis_off()
    fig.suptitle(f"{t.name}: fast = blue, slow = orange")
    fig.savefig(path, dpi=90)


def main(argv=None) -> int:
    """``lookahead-topology FILE [--world-size N] [--plot out.png]``: validate and describe a topology."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--plan" in argv:  # the planner: predicted cost of every built-in family on a cluster (docs/PLANNER.md)
        from lookahead_dist.planner import main as plan_main

        return plan_main([a for a in argv if a != "--plan"])
    parser = argparse.ArgumentParser(prog="lookahead-topology", description=main.__doc__)
    parser.add_argument(
        "--plan",
        action="store_true",
        help="instead of FILE: compare every built-in family on a cluster; see --plan --help",
    )
    parser.add_argument("file", help="topology YAML file")
    parser.add_argument("--world-size", type=int, default=None, help="number of ranks the topology must fit")
    parser.add_argument("--plot", metavar="PNG", default=None, help="draw the graph of each phase into this file")
    args = parser.parse_args(argv)
    try:
        t = load(args.file, world_size=args.world_size)
    except TopologyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report(t))
    if args.plot:
        plot(t, args.plot)
        print(f"\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
