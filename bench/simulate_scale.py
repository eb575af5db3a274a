"""Wall time of the float64 reference engine at scale: vectorized path, then both paths side by side.

    python bench/simulate_scale.py [--agents 1024] [--dim 10000] [--steps 100] [--topology one_peer_exponential]

Prints the median of ``--repeats`` runs of SGD (momentum 0.9) on a Quadratic with
a sparse schedule (mixed with a sparse matmul), and, on a smaller case, the
per-agent path against the vectorized one (the ratio of their times and the
largest difference between their final models).

``--tune-malloc`` raises glibc's mmap and trim thresholds to 1 GiB (``mallopt``)
before running, so that freed (n, d) temporaries are reused instead of being
returned to the kernel and page-faulted in again at every step; it changes
nothing else. Times are wall-clock on a possibly shared machine.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import numpy as np
import torch

from lookahead_dist.mixing import Schedule
from lookahead_dist.reference.problems import Quadratic
from lookahead_dist.reference.simulate import Reference


def ring(n: int) -> Schedule:
    """Metropolis-Hastings ring: 1/3 to self and to each neighbour."""
    P = np.zeros((n, n))
    for i in range(n):
        for j in (i - 1, i, i + 1):
            P[j % n, i] += 1.0 / 3.0
    return Schedule.static(P, name=f"ring({n})")


def one_peer_exponential(n: int) -> Schedule:
    """At step k agent i sends half of its model to i + 2^(k mod log2 n): P_k = (I + S_k) / 2."""
    m = max(1, int(np.ceil(np.log2(n))))
    phases = []
    for j in range(m):
        P = 0.5 * np.eye(n)
        for i in range(n):
            P[i, (i + 2**j) % n] += 0.5
        phases.append(P)
    return Schedule.cyclic(phases, name=f"one_peer_exponential({n})")


TOPOLOGIES = {"ring": ring, "one_peer_exponential": one_peer_exponential}


def timed_run(n: int, d: int, steps: int, topology: str, noise: float, vectorized: bool, seed: int = 0):
    sched = TOPOLOGIES[topology](n)
    q = Quadratic(d=d, n=n, seed=seed, noise=noise)
    ref = Reference(
        sched, ["fast"] * n, q.initial(), q, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), vectorized=vectorized
    )
    assert ref.vectorized is vectorized
    t0, c0 = time.perf_counter(), time.process_time()
    trace = ref.run(steps)
    return time.perf_counter() - t0, time.process_time() - c0, trace


def median_time(repeats: int, **kw):
    """Median wall time and median CPU time (all threads) of ``repeats`` runs."""
    runs = [timed_run(**kw)[:2] for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=10_000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--topology", choices=sorted(TOPOLOGIES), default="one_peer_exponential")
    ap.add_argument("--noise", type=float, default=0.0, help="gradient noise (one generator per agent and step)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small-agents", type=int, default=128)
    ap.add_argument("--small-steps", type=int, default=20)
    ap.add_argument("--tune-malloc", action="store_true", help="glibc mmap/trim thresholds of 1 GiB")
    args = ap.parse_args(argv)
    if args.tune_malloc:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 30)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64, "
        f"malloc {'tuned' if args.tune_malloc else 'default'}"
    )

    common = dict(d=args.dim, topology=args.topology, noise=args.noise)
    t, cpu = median_time(args.repeats, n=args.agents, steps=args.steps, vectorized=True, **common)
    print(
        f"vectorized  n={args.agents:5d} d={args.dim} {args.topology} steps={args.steps}: median {t:6.2f} s wall "
        f"({args.steps / t:5.1f} steps/s), {cpu:6.2f} s CPU"
    )

    small = dict(n=args.small_agents, steps=args.small_steps, **common)
    k = args.small_steps
    times = {}
    for vec in (False, True):
        times[vec] = median_time(args.repeats, vectorized=vec, **small)
        name = "vectorized" if vec else "per-agent"
        print(
            f"{name:10s}  n={args.small_agents:5d} d={args.dim} {args.topology} steps={k}: "
            f"median {times[vec][0]:6.2f} s wall ({k / times[vec][0]:5.1f} steps/s), {times[vec][1]:6.2f} s CPU"
        )
    diff = (timed_run(vectorized=False, **small)[2].X[k] - timed_run(vectorized=True, **small)[2].X[k]).abs().max()
    print(
        f"per-agent / vectorized: {times[False][0] / times[True][0]:.1f}x wall, "
        f"{times[False][1] / times[True][1]:.1f}x CPU; max |difference| of the final models {diff.item():.2e}"
    )


if __name__ == "__main__":
    main()
