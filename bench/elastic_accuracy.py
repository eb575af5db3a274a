"""Accuracy after a lost worker: the survivors' consensus model against runs without failures, on digits.

For each seed, two runs of the default digits config (400 steps, batch 32; ``--algorithm slowmo``:
SlowMo over a ring, ``dpsgd``: D-PSGD over one-peer exponential) under ``python -m
lookahead_dist.elastic --standalone`` with ``elastic.enabled=true``: one where
no worker dies, one where a worker is SIGKILLed mid-run (``debug.kill_step`` / ``debug.kill_rank``)
and the survivors re-plan the ring and finish. The final test accuracy is that of the consensus
model (the exact average of the survivors) on the 360 held-out digits. Prints a markdown table and
the mean difference in points; exits 1 when it is 1.5 points or more.

    python bench/elastic_accuracy.py [--seeds 0 1 2] [--nproc 8] [--algorithm slowmo|dpsgd] [--kill-step 150]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


ALGORITHMS = {
    "slowmo": ["algorithm.name=slowmo", "algorithm.topology=topologies/ring.yaml"],
    "dpsgd": ["algorithm.name=decentralized", "algorithm.topology=topologies/one_peer_exponential.yaml"],
}


def run(out: Path, nproc: int, seed: int, kill: tuple[int, int] | None, algorithm: str = "slowmo") -> dict:
    cmd = [sys.executable, "-m", "lookahead_dist.elastic", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["launch/train.py", "--out", str(out)]
    sets = ["elastic.enabled=true", f"seed={seed}", "eval_every=0", "elastic.heartbeat=0.2", "elastic.dead_after=3"]
    sets += ALGORITHMS[algorithm]
    if kill is not None:
        sets += [f"debug.kill_step={kill[0]}", f"debug.kill_rank={kill[1]}"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--nproc", type=int, default=8)
    p.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="slowmo")
    p.add_argument("--kill-step", type=int, default=150, help="the first seed's kill step; +50 per seed")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="elastic-acc-") as tmp:
        for i, seed in enumerate(args.seeds):
            kill = (args.kill_step + 50 * i, (seed + 1) % args.nproc)
            full = run(Path(tmp) / f"full{seed}", args.nproc, seed, None, args.algorithm)
            lost = run(Path(tmp) / f"lost{seed}", args.nproc, seed, kill, args.algorithm)
            rows.append((seed, kill, full, lost))
    print(f"{args.algorithm} ({' '.join(ALGORITHMS[args.algorithm])}), {args.nproc} workers")
    print("| seed | killed (member at step) | survivors | accuracy, no failure | accuracy, survivors | difference |")
    print("|---|---|---|---|---|---|")
    diffs = []
    for seed, (step, member), full, lost in rows:
        a, b = 100 * full["final_test_accuracy"], 100 * lost["final_test_accuracy"]
        diffs.append(b - a)
        print(f"| {seed} | {member} at {step} | {lost['survivors']} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    mean_full = sum(100 * r[2]["final_test_accuracy"] for r in rows) / len(rows)
    mean_lost = sum(100 * r[3]["final_test_accuracy"] for r in rows) / len(rows)
    gap = mean_lost - mean_full
    print(f"| mean | | | {mean_full:.2f} | {mean_lost:.2f} | {gap:+.2f} |")
    ok = abs(gap) < 1.5
    print(f"mean difference {gap:+.2f} points: {'within' if ok else 'NOT within'} 1.5 points")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
