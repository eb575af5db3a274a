"""Start-up at scale: load and validate a built-in topology, then compile rank 0's plan, at up to 65,536 ranks.

    python bench/scale.py [--sizes 1024 4096 16384 65536] [--families ring torus ...]

For every family and size, in one process, one agent per rank (as a user's job starts):

* ``load``: :func:`lookahead_dist.topology.builtin` with ``world_size = n``, which builds every phase,
  checks it (stochasticity in O(stored entries)) and computes the period consensus rate;
* ``plan``: what :class:`lookahead_dist.engine.MixingEngine` does on rank 0 before its first step: the
  schedule fingerprint, every phase's all-reduce groups (all ranks create them in one order) and rank
  0's plan of every phase;
* the wall time of both (one cold run: nothing is cached between sizes or families), and the peak memory
  of a second run under tracemalloc (every NumPy/SciPy array and Python object it allocates);
* the consensus rate, and for n <= 1,024 its distance to the dense computation (the eigenvalues of the
  dense period product minus J/n), which must be <= 1e-9.

Targets (printed as ok/MISSED): load + plan <= 2 s and <= 500 MB at 65,536 ranks, <= 0.2 s at 4,096;
``complete`` is one all-reduce, and rank 0's plan of it holds one coefficient at every size.
Exits 1 when a target is missed. Times are wall-clock on a possibly shared machine.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc

from lookahead_dist.mixing import consensus_rate
from lookahead_dist.plan import compile_plan, group_rank_sets
from lookahead_dist.topology import builtin

FAMILIES = {
    "ring": {},
    "torus": {},
    "exponential": {},
    "one_peer_exponential": {},
    "hierarchical": {"per_node": 8},
    "complete": {},
}
SIZES = (1024, 4096, 16384, 65536)
DENSE_CHECK_MAX = 1024
TARGETS = {65536: (2.0, 500.0), 4096: (0.2, None)}  # n: (seconds, MB)


def start_up(family: str, n: int):
    """Load and validate, then everything rank 0 compiles: (topology, plans, groups, load s, plan s)."""
    t0 = time.perf_counter()
    topo = builtin(family, world_size=n, **FAMILIES[family])
    t1 = time.perf_counter()
    topo.schedule.fingerprint()
    groups = [group_rank_sets(ph, topo.placement) for ph in topo.schedule.phases]
    plans = [compile_plan(ph, topo.placement, 0) for ph in topo.schedule.phases]
    t2 = time.perf_counter()
    return topo, plans, groups, t1 - t0, t2 - t1


def peak_mb(family: str, n: int) -> float:
    gc.collect()
    tracemalloc.start()
    start_up(family, n)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    args = p.parse_args(argv)
    missed = []
    print(
        "| family | n | phases | load + validate | rank 0 plan | total | peak MB | rate/period | dense diff | target |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        for family in args.families:
            topo, plans, groups, load_s, plan_s = start_up(family, n)
            total = load_s + plan_s
            mb = peak_mb(family, n)
            s = topo.schedule
            rate = s.consensus_rate()
            diff = "-"
            if n <= DENSE_CHECK_MAX:
                d = abs(rate - consensus_rate(s.period_product()))
                diff = f"{d:.1e}"
                if d > 1e-9:
                    missed.append(f"{family} n={n}: the rate differs from the dense one by {d:.3g}")
            verdict = "-"
            if n in TARGETS:
                max_s, max_mb = TARGETS[n]
                ok = total <= max_s and (max_mb is None or mb <= max_mb)
                verdict = "ok" if ok else "MISSED"
                if not ok:
                    missed.append(f"{family} n={n}: {total:.3f} s, {mb:.0f} MB (target {max_s} s, {max_mb} MB)")
            if family == "complete":
                (plan,) = plans
                one = (
                    len(groups[0]) == 1
                    and len(plan.allreduces) == 1
                    and len(plan.allreduces[0].coeffs) == 1
                    and plan.exchange is None
                )
                if not one:
                    missed.append(f"complete n={n}: not one all-reduce with one coefficient: {groups}, {plan}")
            print(
                f"| {family} | {n} | {len(s.phases)} | {load_s:.3f} s | {plan_s:.3f} s | {total:.3f} s | {mb:.1f} | "
                f"{rate:.10g} | {diff} | {verdict} |",
                flush=True,
            )
    if missed:
        print("\nmissed:\n  " + "\n  ".join(missed))
        return 1
    print("\nevery target met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
