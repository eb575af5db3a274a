"""Training throughput of SlowMo against data-parallel all-reduce and against no communication at all.

Four gloo ranks (CPU) train a float32 MLP of about 10.5M parameters on random
data with batch 8 per rank, where communication matters. Every variant has its
own copy of the model (same start) and its own SGD (lr 0.01, momentum 0.9):

* ceiling: the model and SGD alone, no wrapper, no communication;
* SlowMo local: :class:`~lookahead_dist.slowmo.SlowMo` with local SGD as the
  base (tau = 12, its default): one all-reduce every tau steps;
* SlowMo over SGP: the base is the one-peer exponential graph mixed with
  push-sum (``{"generator": "one_peer_exponential", "push_sum": True}``):
  one buffer sent per step, plus the slow step's all-reduce every tau steps;
* DDP: torch's DistributedDataParallel with plain SGD: gradients all-reduced
  every step.

The variants run in rotation (reversed every other cycle), one window (default tau steps, so every window
of a SlowMo variant holds exactly one slow step) at a time, in the same spawned
group. A window's time is barrier, t0, the window's steps, t1 on every rank,
the slowest rank counts. Throughput = ranks x batch x steps / window time; the
ratio to the ceiling is the median over rounds of the ratio within a round.
Bytes per rank per step: for both SlowMo variants as counted by
``SlowMo.bytes_sent`` (the gossip buffers the engine sent, plus each slow
step's all-reduce counted as 2 (p - 1) / p x the buffer), divided by the steps;
DDP, 2 (p - 1) / p x gradient bytes per step (a bandwidth-optimal all-reduce as
a model).

    python bench/slowmo.py [--rounds 9] [--window 12] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from benchutil import mlp, random_batches, slowest_per_round, timed_windows  # noqa: E402

TAU = 12
TARGET_LOCAL = 0.9
SGP_BASE = {"generator": "one_peer_exponential", "push_sum": True}
LR, MOMENTUM = 0.01, 0.9


def worker(rank: int, world: int, cfg: dict) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from lookahead_dist.comm import Comm
    from lookahead_dist.slowmo import SlowMo

    torch.set_num_threads(1)
    comm = Comm(heartbeat=0)
    batches = random_batches(cfg, rank)

    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    runs = {}
    m = mlp(cfg)
    runs["ceiling (no communication)"] = (m, sgd(m))
    m = mlp(cfg)
    local = SlowMo(sgd(m), m, tau=cfg["tau"], comm=comm)
    runs[f"SlowMo local (tau={cfg['tau']})"] = (m, local)
    m = mlp(cfg)
    sgp = SlowMo(sgd(m), m, tau=cfg["tau"], base=SGP_BASE, comm=comm)
    runs[f"SlowMo over SGP (tau={cfg['tau']})"] = (m, sgp)
    m = mlp(cfg)
    runs["DDP all-reduce + SGD"] = (DistributedDataParallel(m), sgd(m))
    times, step_no = timed_windows(runs, batches, cfg["window"], cfg["warmup"], cfg["rounds"])
    names = list(runs)
    params = sum(p.numel() for p in runs[names[0]][0].parameters())
    comm.close()
    return {
        "times": times,
        "params": params,
        "sgp_bytes": sgp.bytes_sent,
        "sgp_steps": step_no[names[2]],
        "local_bytes": local.bytes_sent,
        "local_steps": step_no[names[1]],
    }


def report(results: list[dict], cfg: dict) -> bool:
    world = len(results)
    first = results[0]
    names = list(first["times"])
    rounds = cfg["rounds"]
    per_round = slowest_per_round(results, cfg)
    ceiling = names[0]
    samples = world * cfg["batch"] * cfg["window"]
    pbytes = first["params"] * 4
    allreduce = 2 * (world - 1) * pbytes / world
    sgp = max(r["sgp_bytes"] / r["sgp_steps"] for r in results)
    local = max(r["local_bytes"] / r["local_steps"] for r in results)
    traffic = {
        names[0]: (0.0, "none"),
        names[1]: (local, "SlowMo.bytes_sent: the slow all-reduce / tau"),
        names[2]: (sgp, "SlowMo.bytes_sent: gossip every step + the slow all-reduce / tau"),
        names[3]: (allreduce, "2 (p-1)/p x gradient bytes"),
    }
    print(
        f"{world} gloo ranks, MLP {cfg['d_in']}-{cfg['hidden']}x{cfg['layers']}-{cfg['classes']}: "
        f"{first['params'] / 1e6:.2f}M float32 parameters ({pbytes / 2**20:.1f} MiB), batch {cfg['batch']} "
        f"per rank, SGD lr {LR} momentum {MOMENTUM}; windows of {cfg['window']} steps in rotation, "
        f"median of {rounds} rounds, slowest rank counts"
    )
    print(f"{'variant':30} {'samples/s':>10} {'vs ceiling':>11} {'MiB sent/rank/step':>19}  traffic")
    ok = True
    for n in names:
        rate = samples / statistics.median(per_round[n])
        ratio = statistics.median(c / t for t, c in zip(per_round[n], per_round[ceiling]))
        mib, how = traffic[n]
        line = f"{n:30} {rate:10.1f} {ratio:11.3f} {mib / 2**20:19.2f}  {how}"
        if n == names[1]:
            met = ratio >= TARGET_LOCAL
            ok &= met
            line += f"   target >= {TARGET_LOCAL}: {'met' if met else 'MISSED'}"
        print(line)
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--tau", type=int, default=TAU)
    ap.add_argument("--window", type=int, default=None, help="steps per window (default tau)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--d-in", dest="d_in", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--classes", type=int, default=10)
    args = ap.parse_args(argv)
    cfg = vars(args).copy()
    cfg["window"] = cfg["window"] or args.tau
    if cfg["window"] % args.tau:
        ap.error("--window must be a multiple of --tau (each window then holds the same number of slow steps)")
    from lookahead_dist.testing.spawn import spawn

    results = spawn(worker, args.nproc, cfg, timeout=3600.0, op_timeout=300.0)
    return 0 if report(results, cfg) else 1


if __name__ == "__main__":
    sys.exit(main())
