"""Outer optimizers on the wire: bytes per rank per step and throughput against the no-communication ceiling.

Four spawned gloo ranks on this host (loopback: a message costs a memory copy,
not a network transfer; the emulated cluster, ``python -m lookahead_dist.cluster``,
shapes real links) train a float32 MLP on random data with AdamW inner steps
(lr 1e-3, batch 8 per rank). Every variant has its own copy of the model (same
start) and its own AdamW:

* ceiling: the model and AdamW alone, no wrapper, no communication;
* SlowMo: :class:`~lookahead_dist.slowmo.SlowMo` over local steps (alpha 1,
  beta 0.5): one all-reduce of the model every tau steps;
* DiLoCo: SlowMo with ``outer=`` Nesterov SGD (lr 0.7, momentum 0.9);
* DiLoCo F=4: the same in 4 streaming fragments (a quarter of the model every
  tau/4 steps: the same bytes, a quarter of the peak);
* DiLoCo int8: the pseudo-gradient averaged in int8 with error feedback
  (block scales by a MAX all-reduce, codes by all-to-all and all-gather);

each at tau = 12 and 48. The variants run in rotation (reversed every other
cycle), one window of 48 steps at a time (so every window holds whole periods
of both taus), in the same spawned group. A window's time is barrier, t0, the
window's steps, t1 on every rank; the slowest rank counts. Throughput = ranks x
batch x steps / window time; the ratio to the ceiling is the median over rounds
of the ratio within a round. Bytes per rank per step: ``SlowMo.bytes_sent`` (an
all-reduce counted as 2 (p - 1) / p x its buffer; the compressed sync as what its
collectives send) over the steps taken.

    python bench/outer.py [--rounds 5] [--batch 8] [--hidden 1024]
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

TAUS = (12, 48)
WINDOW = 48  # a multiple of every tau
LR = 1e-3
CEILING = "ceiling (no communication)"


def nesterov(params):
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


#: name -> SlowMo's keyword arguments besides tau
VARIANTS = {
    "SlowMo": dict(alpha=1.0, beta=0.5),
    "DiLoCo": dict(outer=nesterov),
    "DiLoCo F=4": dict(outer=nesterov, fragments=4),
    "DiLoCo int8": dict(outer=nesterov, sync_dtype="int8"),
}


def worker(rank: int, world: int, cfg: dict) -> dict:
    from lookahead_dist.comm import Comm
    from lookahead_dist.slowmo import SlowMo

    torch.set_num_threads(1)
    comm = Comm(heartbeat=0)
    batches = random_batches(cfg, rank)

    def adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=LR)

    runs = {}
    m = mlp(cfg)
    runs[CEILING] = (m, adamw(m))
    for tau in TAUS:
        for name, kw in VARIANTS.items():
            m = mlp(cfg)
            runs[f"{name} tau={tau}"] = (m, SlowMo(adamw(m), m, tau=tau, comm=comm, **kw))
    times, step_no = timed_windows(runs, batches, WINDOW, cfg["warmup"], cfg["rounds"])
    sent = {name: (getattr(opt, "bytes_sent", 0), step_no[name]) for name, (_, opt) in runs.items()}
    params = sum(p.numel() for p in runs[CEILING][0].parameters())
    comm.close()
    return {"times": times, "params": params, "sent": sent}


def report(results: list[dict], cfg: dict) -> None:
    world = len(results)
    first = results[0]
    names = list(first["times"])
    rounds = cfg["rounds"]
    per_round = slowest_per_round(results, cfg)
    samples = world * cfg["batch"] * WINDOW
    pbytes = first["params"] * 4
    print(
        f"transport: loopback (one host, {world} spawned gloo ranks over 127.0.0.1; a message costs a memory copy, "
        "not a network transfer: the emulated cluster, python -m lookahead_dist.cluster, measures shaped links)"
    )
    print(
        f"MLP {cfg['d_in']}-{cfg['hidden']}x{cfg['layers']}-{cfg['classes']}: {first['params'] / 1e6:.2f}M float32 "
        f"parameters ({pbytes / 2**20:.1f} MiB), batch {cfg['batch']} per rank, AdamW lr {LR} inner; windows of "
        f"{WINDOW} steps in rotation, median of {rounds} rounds, slowest rank counts"
    )
    base = {}
    print(
        f"{'variant':27} {'samples/s':>10} {'vs ceiling':>11} {'KiB sent/rank/step':>19} {'vs SlowMo':>10} "
        f"{'KiB per sync':>13}"
    )
    for n in names:
        rate = samples / statistics.median(per_round[n])
        ratio = statistics.median(c / t for t, c in zip(per_round[n], per_round[CEILING]))
        per_step = max(r["sent"][n][0] / max(r["sent"][n][1], 1) for r in results)
        line = f"{n:27} {rate:10.1f} {ratio:11.3f} {per_step / 1024:19.1f}"
        if n != CEILING:
            tau = int(n.rsplit("=", 1)[1])
            frags = 4 if "F=4" in n else 1
            base.setdefault(tau, per_step)  # SlowMo comes first for each tau
            line += f" {per_step / base[tau]:10.3f} {per_step * tau / frags / 1024:13.1f}"
        print(line)
    print(
        "KiB per sync: what one sync sends per rank (with fragments, one fragment's sync: the peak drops F-fold); "
        "vs SlowMo: bytes per step relative to SlowMo at the same tau"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--d-in", dest="d_in", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--classes", type=int, default=10)
    args = ap.parse_args(argv)
    cfg = vars(args).copy()
    from lookahead_dist.testing.spawn import spawn

    results = spawn(worker, args.nproc, cfg, timeout=3600.0, op_timeout=300.0)
    report(results, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
