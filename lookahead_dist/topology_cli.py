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
from lookahead_dist.mixing import Phase, Schedule
from lookahead_dist.topology import Topology, load

__all__ = ["main", "plot", "report"]


def _vec(v) -> str:
    v = np.asarray(v)
    if v.size <= 16:
        return "[" + ", ".join(f"{x:.6g}" for x in v) + "]"
    if np.all(v == v[0]):
        return f"[{v[0]:.6g} for every one of the {v.size} agents]"
    return f"[{v.size} entries from {v.min():.6g} to {v.max():.6g}]"


def _list(items) -> str:
    """A list of ints, abbreviated past 16 entries (a contiguous run as its two ends)."""
    items = list(items)
    if len(items) <= 16:
        return str(items)
    if items == list(range(items[0], items[0] + len(items))):
        return f"[{items[0]} .. {items[-1]}] ({len(items)} entries)"
    return "[" + ", ".join(map(str, items[:8])) + f", ..., {items[-1]}] ({len(items)} entries)"


def _per_rank(values, fmt) -> str:
    if len(values) <= 16:
        return ", ".join(f"rank {r}: {fmt(m)}" for r, m in enumerate(values))
    return f"ranks 0 .. {len(values) - 1}: from {fmt(min(values))} to {fmt(max(values))}"


def _matrix_text(P: np.ndarray) -> list:
    if P.shape[0] > 12:
        return ["".join("x" if x else "." for x in row) for row in P]
    return [" ".join(f"{x:7.4f}" for x in row) for row in P]


#: The most agents whose matrices the report prints (as numbers up to 12, as a pattern of x and . up to this).
PRINT_AGENTS = 64
#: The most all-reduce groups listed one per line for a phase.
PRINT_GROUPS = 16


def report(t: Topology) -> str:
    """A human-readable description of a topology (what the command line prints).

    Every number comes from the sparse forms (O(stored entries) per phase), so it works at any size;
    matrices, lists and per-rank figures are abbreviated past a few dozen agents.
    """
    from lookahead_dist.plan import group_rank_sets, send_peer_counts

    s = t.schedule
    out = [f"{t.name}  ({t.source})"]
    if t.description:
        out.append(f"  {t.description}")
    placement = list(t.placement)
    where = _list(placement) if t.n <= 16 or placement != list(range(t.n)) else "agent i on rank i"
    out += [
        f"agents: {t.n} on {t.world_size} ranks; push-sum: {'yes' if t.push_sum else 'no'}; "
        f"fast: {_list(t.fast_agents)}; slow: {_list(t.slow_agents)}",
        f"placement (agent -> rank): {where}",
        f"period: {s.period} steps, {len(s.phases)} phases",
    ]
    kind = "row i = how agent i splits its mass" if t.push_sum else "column j = the weights agent j takes"
    avg, allreduces = np.zeros(t.world_size), 0
    for k, ph in enumerate(s.phases):
        out += ["", f"phase {k}" + (f" ({ph.name})" if ph.name else "") + f", repeat {ph.repeat}"]
        if t.n <= PRINT_AGENTS:
            out.append(f"  P ({kind}" + ("; x = non-zero)" if t.n > 12 else ")"))
            out += ["    " + line for line in _matrix_text(ph.matrix)]
        else:
            form = "exact averaging in groups" if ph.averaging is not None else f"{ph.nnz} stored entries"
            out.append(f"  P ({kind}): {t.n} x {t.n}, {form}")
        single = Schedule([Phase(ph, 1, ph.name)], push_sum=t.push_sum)
        try:
            out.append(f"  invariant vector: {_vec(single.invariant_vector())}")
            out.append(f"  consensus rate: {single.consensus_rate():.6g}")
        except MixingError as exc:
            out.append(f"  invariant vector: none unique ({exc}); consensus rate: 1 (no consensus in this phase)")
        sends = send_peer_counts(ph, t.placement).tolist()
        groups = group_rank_sets(ph, t.placement)
        avg += ph.repeat * np.array(sends)
        if ph.is_identity:
            out.append("  messages per step: none (identity: no communication)")
        elif not groups and not any(sends):
            out.append("  messages per step: none (local arithmetic on each rank)")
        out += [f"  one all-reduce over ranks {_list(g)}" for g in groups[:PRINT_GROUPS]]
        if len(groups) > PRINT_GROUPS:
            out.append(f"  ... and {len(groups) - PRINT_GROUPS} more all-reduces ({len(groups)} in all)")
        allreduces += ph.repeat * len(groups)
        if any(sends):
            per_rank = (
                f"every rank: {sends[0]}" if len(set(sends)) == 1 else _per_rank(sends, str) + f" (max {max(sends)})"
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
        + _per_rank((avg / s.period).tolist(), lambda m: f"{m:.3g}")
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
        rows, cols, _ = ph.entries()
        G.add_edges_from((int(i), int(j)) for i, j in zip(rows.tolist(), cols.tolist()) if i != j)
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
