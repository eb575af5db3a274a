"""Theorem 2 measured: the mean of ||grad f(y_k)||^2 over K steps against bound (14).

Runs serial Lookahead with SGD on the rippled quadratic
f(x) = sum_i [x_i^2 / 2 - cos(2 x_i)] (d = 10, L = 5, non-convex) with Gaussian
gradient noise of total variance sigma2, for a grid of (alpha, tau, gamma), and
prints side by side: the value of (13), the empirical mean over K steps (averaged
over seeds), bound (14), and their ratio.  Then, for each (tau, gamma), the alpha
recommended by the bound against the best alpha of the grid.

    python bench/theorem2.py --K 10000 --seeds 20 --out theorem2.csv
"""

import argparse
import csv
import math
import sys
import time

from lookahead_dist.reference import theory as th


def _floats(text):
    return [float(v) for v in text.split(",") if v]


def _ints(text):
    return [int(v) for v in text.split(",") if v]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--K", type=int, default=10000, help="steps per run (a multiple of every tau)")
    parser.add_argument("--seeds", type=int, default=20, help="independent runs per configuration")
    parser.add_argument("--sigma2", type=float, default=20.0, help="total gradient-noise variance")
    parser.add_argument("--alphas", type=_floats, default=[0.1, 0.2, 0.3, 0.5, 0.7, 0.85, 1.0])
    parser.add_argument("--taus", type=_ints, default=[1, 5, 10])
    parser.add_argument("--gammas", type=_floats, default=[0.01, 0.03])
    parser.add_argument("--out", default=None, help="optional CSV file for the table")
    args = parser.parse_args(argv)

    problem = th.RippledQuadratic()
    f_gap = float(problem.value(problem.default_start())) - problem.f_inf
    L, sigma2, K, seeds = problem.L, args.sigma2, args.K, range(args.seeds)
    print(
        f"f(x) = sum_i [x_i^2/2 - cos(2 x_i)], d={problem.d}, L={L:g}, "
        f"min curvature={problem.min_curvature:g}, f_gap={f_gap:.4f}, sigma2={sigma2:g}, "
        f"K={K}, seeds={args.seeds}"
    )

    def measure(alpha, tau, gamma):
        runs = th.empirical_gradient_norm(alpha, tau, gamma, K, seeds, sigma2=sigma2)
        return runs.mean(), runs.std(ddof=1) / math.sqrt(len(runs)) if len(runs) > 1 else float("nan")

    rows = []
    header = (
        f"{'alpha':>6} {'tau':>4} {'gamma':>6} {'(13)':>8} {'empirical':>10} {'+-se':>7} {'bound(14)':>10} {'ratio':>6}"
    )
    print(header)
    start = time.perf_counter()
    for tau in args.taus:
        for gamma in args.gammas:
            for alpha in args.alphas:
                cond = th.step_size_condition(alpha, gamma, L, tau)
                if cond > 1.0:
                    print(f"{alpha:6.3f} {tau:4d} {gamma:6.3f} {cond:8.4f}   (13) fails: bound not proved, skipped")
                    continue
                emp, se = measure(alpha, tau, gamma)
                b = th.bound(alpha, gamma, L, sigma2, tau, K, f_gap)
                rows.append(
                    dict(
                        alpha=alpha,
                        tau=tau,
                        gamma=gamma,
                        cond13=cond,
                        empirical=emp,
                        stderr=se,
                        bound14=b,
                        ratio=emp / b,
                    )
                )
                print(f"{alpha:6.3f} {tau:4d} {gamma:6.3f} {cond:8.4f} {emp:10.4f} {se:7.4f} {b:10.4f} {emp / b:6.3f}")
    worst = max(r["ratio"] for r in rows) if rows else float("nan")
    print(f"max ratio empirical / bound = {worst:.3f} (Theorem 2 says <= 1)  [{time.perf_counter() - start:.1f} s]")

    print()
    print("recommended alpha (minimizes bound (14) under (13)) vs the grid:")
    print(
        f"{'tau':>4} {'gamma':>6} {'recommended':>11} {'emp@rec':>8} {'bound@rec':>9} "
        f"{'best grid (emp)':>15} {'emp':>8} {'best grid (bound)':>17} {'bound':>8}"
    )
    for tau in args.taus:
        for gamma in args.gammas:
            cell = [r for r in rows if r["tau"] == tau and r["gamma"] == gamma]
            if not cell:
                continue
            rec = th.recommended_alpha(gamma, L, sigma2, tau, K, f_gap)
            emp_rec, _ = measure(rec, tau, gamma)
            by_emp = min(cell, key=lambda r: r["empirical"])
            by_bound = min(cell, key=lambda r: r["bound14"])
            print(
                f"{tau:4d} {gamma:6.3f} {rec:11.4f} {emp_rec:8.4f} "
                f"{th.bound(rec, gamma, L, sigma2, tau, K, f_gap):9.4f} {by_emp['alpha']:15.3f} "
                f"{by_emp['empirical']:8.4f} {by_bound['alpha']:17.3f} {by_bound['bound14']:8.4f}"
            )

    if args.out:
        with open(args.out, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["alpha"])
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {len(rows)} rows to {args.out}")
    return 0 if worst <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
