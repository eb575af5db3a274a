"""Overlapped gossip on the emulated cluster: step times against compute, communication, blocking and DDP,
time to 95 % test accuracy on digits, and the cost model's overlapped step against the measurement.

Length: over 500 lines because the three measurements (steps, time to accuracy, the cost model) share
one cluster harness, one timing convention and one report; split, each would repeat them.

Runs ``python -m lookahead_dist.cluster`` (needs root) with one rank per node, each node's egress shaped
to 1 Gbit/s, and this script inside it as the worker. The model is ``digits_mlp`` (7.8M parameters,
31.2 MB in float32), the base optimizer Adam (lr 2e-3, fused), the data the 8x8 digits.

**Steps** (4 and 8 nodes, one cluster run each). First the batch size per worker: the compute-only
step (forward, backward, Adam) is timed at a few batch sizes on every rank at once, the
communication-only steps of the ring and of the one-peer exponential graph are timed, and the batch
whose compute lies at the geometric mean of the two is taken (interpolated), so that compute and
communication are of similar size on both graphs (``--per-graph-batch``: each graph, DDP with the
one-peer graph, runs the batch whose compute equals its own communication; the time to accuracy
keeps the geometric mean's). Then, per topology (ring, one-peer exponential,
each with and without push-sum), these variants run in rotation (reversed every other cycle), each a
window of steps timed barrier, t0, steps, t1 on every rank; a window's time runs from the last rank's
t0 to the last rank's t1 (one clock on the machine), the step time is the median over repetitions
divided by the window's steps:

* compute: forward, backward and the base optimizer step, no communication;
* comm: ``Decentralized.step()`` without gradients: the exchange and the combine (push-sum's scaling);
* blocking: forward, backward, ``Decentralized.step()`` (adapt-then-combine, the default);
* overlapped: the same with ``overlap=True``; one untimed step before t0 puts the first exchange in
  flight, and the exchange left in flight at t1 is waited for after it, so the window holds exactly
  its steps, each with one exchange behind its forward and backward;
* ddp (with the push-sum one-peer group): forward and backward under DistributedDataParallel (gradient
  buckets all-reduced during backward) and the base step.

**Cost model.** The overlapped step is predicted by
:func:`lookahead_dist.costmodel.overlapped_step_time` from the measured forward and backward, the cost
model's communication and combine on the compiled plans (:func:`~lookahead_dist.costmodel.schedule_cost`
at the shaped rate, gloo's per-operation overhead, the memory rate measured in the worker), the measured
base step and snapshot copy, and a CPU-contention term: the seconds per byte of traffic that the
compute loses to the communication on the shared cores, measured before the variants and apart from them
(every rank sends the model's bytes to rank + 1 with a raw ``Comm.start_exchange`` while all compute; the
forward and backward are timed with and without it). The blocking prediction is compute + communication + combine.

**Time to accuracy** (``--tta-nodes``, default 4). With the batch size chosen for those nodes (capped
at a worker's shard of the digits training split), every algorithm trains from the same start per
seed: DDP; D-PSGD (ring) and SGP (one-peer exponential, push-sum), each blocking and overlapped;
local SGD (an exact average every tau steps); SlowMo over local SGD (overlapped slow step) and over
overlapped SGP (overlapped slow step). The taus are the planner's (:func:`lookahead_dist.planner.plan_rows`
and :func:`~lookahead_dist.planner.recommend` at the measured compute: the fastest step among its local
SGD rows that reach consensus within 32 steps, and among its SlowMo rows by the overlapped step), offered
its own taus up to half the first seed's steps, so that a run holds at least two slow steps (the SlowMo
rows all reach consensus through the gossip, so the planner takes the largest tau it is offered). After
every step each rank copies its model (and push-sum weight) into a file mapped from /dev/shm, with the
clock paused (the pause is printed: an exchange in flight moves on during it, a bias of at most that
much per step in favour of overlap). After the run
the consensus model (the exact average, push-sum: sum x / sum w) of every step is scored on the test
split, and the time to 0.95 is the wall time of the first step that reaches it plus, for every
algorithm but DDP, the measured time of ``finalize()`` (the exact average that produces that model).
Algorithms run in rotation per seed; the first seed runs ``--steps`` steps, is scored at every step and
draws the plot; later seeds stop a sixth (at least 3 steps) after the step where the first reached 0.95
and are scored up to their own first 0.95.

    sudo python bench/overlap.py [--quick] [--reps 5] [--seeds 3] [--nodes 4 8] [--tta-nodes 4] [--batch B]
                                 [--per-graph-batch]

Prints every measurement and ratio, the targets met or missed and the load average; writes
docs/img/overlap_tta.png. Exit code 0 iff every run completed and every target was met.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchutil import rotation  # noqa: E402

RATE = "1gbit"
LR = 2e-3
TARGET_ACC = 0.95
BATCHES = (32, 64, 128, 256)
TOPOLOGIES = {
    "ring": {"generator": "ring"},
    "ring push-sum": {"generator": "ring", "push_sum": True},
    "one-peer exp": {"generator": "one_peer_exponential"},
    "one-peer exp push-sum": {"generator": "one_peer_exponential", "push_sum": True},
}
DDP_GROUP = "one-peer exp push-sum"
ALGOS = ("DDP", "D-PSGD", "D-PSGD overlap", "SGP", "SGP overlap", "local SGD", "SlowMo local", "SlowMo SGP overlap")
TARGETS = {  # name: (nodes, bound, "<=" or ">=")
    "overlapped / max(compute, comm)": (4, 1.25, "<="),
    "throughput overlapped / blocking": (4, 1.5, ">="),
    "throughput overlapped / blocking (8)": (8, 1.25, ">="),
    "SGP overlapped step / DDP step": (8, 0.75, "<="),
    "cost model |error| overlapped": (4, 0.20, "<="),
    "best decentralized time to 0.95 / DDP": (None, 0.5, "<="),
}


# -- the worker (inside the emulated cluster) ---------------------------------------------------------


def _setup():
    import torch

    from lookahead_dist.comm import Comm, init_process_group

    torch.set_num_threads(1)
    init_process_group("gloo", timeout_s=600)
    return Comm(heartbeat=0)


def _model(seed: int = 0):
    import torch

    from lookahead_dist.train.models import DigitsMLP

    torch.manual_seed(seed)
    return DigitsMLP()


def _adam(params):
    """Adam, lr 2e-3, fused: on the CPU one pass over the parameters (the default loops take 10x longer,
    and that time cannot hide behind communication)."""
    import torch

    return torch.optim.Adam(params, lr=LR, fused=True)


def _fb(model, x, y) -> float:
    """Forward and backward; returns the loss."""
    import torch

    for p in model.parameters():
        p.grad = None
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return float(loss.detach())


def _window(comm, n: int, body, before=None, after=None) -> list[float]:
    """barrier, ``before()`` (untimed), t0, ``n`` x ``body()``, t1, ``after()`` (untimed): [t0, t1]."""
    comm.barrier()
    if before is not None:
        before()
    t0 = time.perf_counter()
    for _ in range(n):
        body()
    t1 = time.perf_counter()
    if after is not None:
        after()
    return [t0, t1]


def _memory_rate(nbytes: int) -> tuple[float, float]:
    """(combine bytes/s of x.mul_(w); x.add_(y, alpha=w), counted as 3 buffers; seconds of one copy_)."""
    import torch

    x, y = torch.ones(nbytes // 4), torch.ones(nbytes // 4)
    comb, copy = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        x.mul_(0.5)
        x.add_(y, alpha=0.5)
        t1 = time.perf_counter()
        y.copy_(x)
        comb.append(t1 - t0)
        copy.append(time.perf_counter() - t1)
    return 3 * nbytes / statistics.median(comb), statistics.median(copy)


def _digits(seed: int = 0):
    from lookahead_dist.train.data import load_digits_split

    return load_digits_split(0.2, seed)


def _choose_batch(comm, xtr, ytr, reps: int, log) -> dict:
    """Time compute-only steps at BATCHES and communication-only steps of ring and one-peer exponential;
    per graph the batch whose compute equals its communication, and the batch whose compute is the geometric mean
    of the two (every rank gets rank 0's)."""
    import torch

    from lookahead_dist import Decentralized

    gen = torch.Generator().manual_seed(100 + comm.rank)
    model = _model()
    opt = _adam(model.parameters())

    def step(x, y):
        _fb(model, x, y)
        opt.step()

    batches = {}
    for b in BATCHES:
        idx = torch.randint(0, len(xtr), (b,), generator=gen)
        batches[b] = (xtr[idx], ytr[idx])
        step(*batches[b])
    compute = {b: [] for b in BATCHES}
    for rep in range(reps):  # in rotation: a change of the machine's load spreads over every batch size
        for b in rotation(list(BATCHES), rep):
            compute[b].append(_window(comm, 1, lambda: step(*batches[b])))  # noqa: B023 (called at once)
    comm_only = {}
    for name in ("ring", "one-peer exp"):
        m = _model()
        w = Decentralized(_adam(m.parameters()), m, TOPOLOGIES[name], comm=comm)
        period = w.topology.schedule.period
        w.step()
        comm_only[name] = [_window(comm, period, w.step) for _ in range(reps)]
        comm_only[name + " period"] = period
        del w, m
        gc.collect()
    spans = comm.all_gather_object({"compute": compute, "comm": comm_only})
    choice = None
    if comm.rank == 0:
        c = {b: span([s["compute"][b] for s in spans]) for b in BATCHES}
        m = {k: span([s["comm"][k] for s in spans]) / spans[0]["comm"][k + " period"] for k in ("ring", "one-peer exp")}
        target = math.sqrt(m["ring"] * m["one-peer exp"])
        choice = _interpolate(c, target)
        log(
            "batch: compute "
            + ", ".join(f"{b}: {t:.3f} s" for b, t in c.items())
            + f"; comm ring {m['ring']:.3f} s, one-peer {m['one-peer exp']:.3f} s; target {target:.3f} s -> {choice}"
        )
        per_graph = {k: _interpolate(c, m[k]) for k in ("ring", "one-peer exp")}
        log(f"batch per graph (compute = its communication): {per_graph}")
        choice = {"batch": choice, "compute": c, "comm": m, "target": target, "per_graph": per_graph}
    return comm.all_gather_object(choice)[0]


def _graph(group: str) -> str:
    """The graph of a measured group: 'ring' or 'one-peer exp' (push-sum or not)."""
    return "ring" if group.startswith("ring") else "one-peer exp"


def compute_at(curve: dict, batch: int) -> float:
    """The compute time at ``batch`` on the least-squares line through the measured compute times."""
    import numpy as np

    b, t = np.array(sorted(curve), dtype=float), np.array([curve[k] for k in sorted(curve)])
    slope, icpt = np.polyfit(b, t, 1)
    return float(icpt + slope * batch)


def _interpolate(curve: dict, target: float) -> int:
    """The batch (a multiple of 8) at which the least-squares line through the measured compute times
    reaches ``target`` (compute is a fixed part plus a part per example)."""
    import numpy as np

    b, t = np.array(sorted(curve), dtype=float), np.array([curve[k] for k in sorted(curve)])
    slope, icpt = np.polyfit(b, t, 1)
    best = (target - icpt) / slope if slope > 0 else b[-1]
    return int(max(8, min(4096, round(best / 8) * 8)))


def _contention(comm, x, y, reps: int) -> dict:
    """Forward and backward alone, a shift by one rank of the model's bytes alone, and both at once."""
    import torch

    model = _model()
    nbytes = sum(p.numel() for p in model.parameters()) * 4
    send, recv = torch.ones(nbytes // 4), torch.empty(nbytes // 4)
    r, n = comm.rank, comm.world_size
    out = {"alone": [], "shift": [], "both": [], "both_comm": [], "bytes": n * nbytes}
    for rep in range(reps):
        for what in rotation(["alone", "shift", "both"], rep):
            comm.barrier()
            t0 = time.perf_counter()
            if what == "alone":
                _fb(model, x, y)
                out["alone"].append([t0, time.perf_counter()])
            elif what == "shift":
                comm.start_exchange([((r + 1) % n, send)], [((r - 1) % n, recv)]).wait()
                out["shift"].append([t0, time.perf_counter()])
            else:
                pending = comm.start_exchange([((r + 1) % n, send)], [((r - 1) % n, recv)])
                _fb(model, x, y)
                t1 = time.perf_counter()
                pending.wait()
                out["both"].append([t0, t1])
                out["both_comm"].append([t0, time.perf_counter()])
    return out


def _measure_group(comm, topo, reps: int, next_batch, ddp: bool) -> dict:
    """The variants of one topology in rotation: compute, comm, blocking, overlapped (and ddp)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lookahead_dist import Decentralized

    mb, mo = _model(), _model()
    wb = Decentralized(_adam(mb.parameters()), mb, topo, comm=comm)
    wo = Decentralized(_adam(mo.parameters()), mo, topo, comm=comm, overlap=True)
    n = wb.topology.schedule.period
    n = n * max(1, round(2 / n))  # about 2 steps, whole periods
    fb_s, opt_s = [], []

    def compute():
        t0 = time.perf_counter()
        _fb(mb, *next_batch())
        t1 = time.perf_counter()
        wb.optimizer.step()
        fb_s.append(t1 - t0)
        opt_s.append(time.perf_counter() - t1)

    def comm_only():
        for p in mb.parameters():
            p.grad = None
        wb.step()

    def blocking():
        _fb(mb, *next_batch())
        wb.step()

    def overlapped():
        _fb(mo, *next_batch())
        wo.step()

    bodies = {"compute": compute, "comm": comm_only, "blocking": blocking, "overlapped": overlapped}
    if ddp:
        md = DDP(_model())
        od = _adam(md.parameters())

        def ddp_step():
            _fb(md, *next_batch())
            od.step()

        bodies["ddp"] = ddp_step
    for body in bodies.values():  # warm up: connections, scratch buffers
        body()
    wo.wait()
    times = {v: [] for v in bodies}
    for rep in range(reps):
        for v in rotation(list(bodies), rep):
            if v == "overlapped":  # one untimed step puts an exchange in flight; the last one is waited for after t1
                times[v].append(_window(comm, n, overlapped, before=overlapped, after=wo.wait))
            else:
                times[v].append(_window(comm, n, bodies[v]))
    return {
        "steps": n,
        "times": times,
        "fb_s": statistics.median(fb_s),
        "opt_s": statistics.median(opt_s),
        "buffer_bytes": wo.engine.buffer_bytes(),
    }


def steps_worker(cfg: dict, out: str) -> None:
    import torch

    comm = _setup()
    reps = cfg["reps"]

    began = time.monotonic()

    def log(msg):
        if comm.rank == 0:
            print(
                f"[overlap {comm.world_size} nodes, {time.monotonic() - began:.0f} s] {msg}",
                file=sys.stderr,
                flush=True,
            )

    xtr, ytr, _, _ = _digits()
    if cfg.get("batch"):
        choice = {"batch": cfg["batch"], "target": None}
    else:
        choice = _choose_batch(comm, xtr, ytr, 3, log)
    batch = choice["batch"]
    per_graph = choice.get("per_graph") if cfg.get("per_graph") else None
    group_batch = {name: per_graph[_graph(name)] if per_graph else batch for name in TOPOLOGIES}
    gen = torch.Generator().manual_seed(comm.rank)
    pools = {}
    for b in sorted({batch, *group_batch.values()}):
        pools[b] = [(xtr[i], ytr[i]) for i in (torch.randint(0, len(xtr), (b,), generator=gen) for _ in range(8))]
    batches = pools[batch]
    nbytes = sum(p.numel() for p in _model().parameters()) * 4
    mem_rate, copy_s = _memory_rate(nbytes)
    result = {
        "rank": comm.rank,
        "batch": batch,
        "group_batch": group_batch,
        "choice": choice,
        "memory_bytes_per_s": mem_rate,
        "copy_s": copy_s,
        "contention": _contention(comm, *batches[0], reps),
        "groups": {},
    }
    log(f"batch {batch}, per group {group_batch}; contention measured")
    k = [0]

    for name, topo in TOPOLOGIES.items():
        pool = pools[group_batch[name]]

        def next_batch():
            k[0] += 1
            return pool[k[0] % len(pool)]  # noqa: B023 (used within this iteration only)

        result["groups"][name] = _measure_group(comm, topo, reps, next_batch, ddp=name == DDP_GROUP)
        log(f"{name}: done")
        gc.collect()
    everything = comm.all_gather_object(result)
    if comm.rank == 0:
        with open(out, "w") as f:
            json.dump(everything, f)
    comm.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # destroying the group under a live DDP reducer can deadlock on the GIL


# -- time to accuracy ----------------------------------------------------------------------------------


def _build(algo: str, model, comm, taus: dict):
    """(the optimizer to step, the module to run forward on) for one algorithm."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lookahead_dist import Decentralized, SlowMo

    sgp = TOPOLOGIES["one-peer exp push-sum"]
    if algo == "DDP":
        net = DDP(model)
        return _adam(net.parameters()), net
    adam = _adam(model.parameters())
    if algo.startswith("D-PSGD"):
        return Decentralized(adam, model, TOPOLOGIES["ring"], comm=comm, overlap="overlap" in algo), model
    if algo.startswith("SGP"):
        return Decentralized(adam, model, sgp, comm=comm, overlap="overlap" in algo), model
    if algo == "local SGD":
        return SlowMo(adam, model, tau=taus["local"], alpha=1.0, beta=0.0, comm=comm), model
    if algo == "SlowMo local":
        return SlowMo(adam, model, tau=taus["local"], comm=comm, overlap_slow=True), model
    if algo == "SlowMo SGP overlap":
        return SlowMo(adam, model, tau=taus["slowmo"], base=sgp, comm=comm, overlap=True, overlap_slow=True), model
    raise ValueError(algo)


def _run_tta(comm, algo: str, seed: int, steps: int, cfg: dict, data, snapdir: str) -> dict:
    import torch

    from lookahead_dist.train.consensus import push_sum_weight
    from lookahead_dist.train.data import shard_batches, shard_indices

    xtr, ytr = data
    model = _model(seed)
    opt, net = _build(algo, model, comm, cfg["taus"])
    shard = shard_indices(len(xtr), comm.rank, comm.world_size, seed)
    stream = shard_batches(xtr, ytr, shard, seed, comm.rank, cfg["batch"])
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    # every step's model and weight go into a file in /dev/shm, mapped: one copy in memory, no write
    store = torch.from_file(
        os.path.join(snapdir, f"r{comm.rank}"), shared=True, size=steps * (n + 1), dtype=torch.float32
    ).view(steps, n + 1)
    store.zero_()  # its pages are allocated now, not in the timed loop
    ends, losses, paused = [], [], 0.0
    comm.barrier()
    start = time.perf_counter()
    for k in range(steps):
        x, y = next(stream)
        for p in net.parameters():
            p.grad = None
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        t = time.perf_counter()
        ends.append(t - start - paused)
        losses.append(float(loss.detach()))
        torch.cat([p.detach().reshape(-1) for p in params], out=store[k, :n])  # the clock is paused meanwhile
        store[k, n] = push_sum_weight(opt)
        paused += time.perf_counter() - t
    del store
    t = time.perf_counter()
    if algo != "DDP":
        opt.finalize()
    final_s = time.perf_counter() - t
    if hasattr(opt, "wait"):
        opt.wait()
    comm.barrier()
    del opt, net, model
    gc.collect()
    return {"ends": ends, "losses": losses, "paused": paused / steps, "final_s": final_s}


def _score(comm, steps: int, snapdir: str, test, first_hit_only: bool) -> dict:
    """Test accuracy of the consensus model sum_i w_i x_i / sum_i w_i of every step (of the files), W steps at a
    time (rank r scores step base + r); with ``first_hit_only``, up to the first W steps that hold a 0.95."""
    import numpy as np
    import torch

    xte, yte = test
    model = _model()
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    stores = [
        np.memmap(os.path.join(snapdir, f"r{r}"), dtype=np.float32, mode="c", shape=(steps, n + 1))
        for r in range(comm.world_size)
    ]
    acc, base = {}, 0
    while base < steps:
        k, mine = base + comm.rank, {}
        if k < steps:
            rows = [torch.from_numpy(st[k]) for st in stores]
            wsum = sum(float(row[n]) for row in rows)
            flat = torch.zeros(n)
            for row in rows:
                flat.add_(row[:n], alpha=float(row[n]) / wsum)
            torch.nn.utils.vector_to_parameters(flat, params)
            with torch.no_grad():
                mine[k] = float((model(xte).argmax(1) == yte).float().mean())
        for part in comm.all_gather_object(mine):
            acc.update(part)
        if first_hit_only and any(a >= TARGET_ACC for a in acc.values()):
            break
        base += comm.world_size
    del stores
    return acc


def tta_worker(cfg: dict, out: str) -> None:
    comm = _setup()
    results = []
    budget = {a: cfg["steps"] for a in cfg["algos"]}
    for s, seed in enumerate(cfg["seeds"]):
        xtr, ytr, xte, yte = _digits(seed)
        for algo in rotation(list(cfg["algos"]), s):
            snapdir = os.path.join(cfg["snapdir"], f"{seed}-{algo.replace(' ', '_')}")
            if comm.rank == 0:
                os.makedirs(snapdir, exist_ok=True)
            comm.barrier()
            steps = budget[algo]
            run = _run_tta(comm, algo, seed, steps, cfg, (xtr, ytr), snapdir)
            acc = _score(comm, steps, snapdir, (xte, yte), first_hit_only=s > 0)
            runs = comm.all_gather_object(run)
            comm.barrier()
            if comm.rank == 0:
                shutil.rmtree(snapdir, ignore_errors=True)
                n = len(runs)
                ends = [max(r["ends"][k] for r in runs) for k in range(steps)]
                rec = {
                    "algo": algo,
                    "seed": seed,
                    "steps": steps,
                    "ends": ends,
                    "loss": [sum(r["losses"][k] for r in runs) / n for k in range(steps)],
                    "acc": [acc.get(k, math.nan) for k in range(steps)],
                    "final_s": max(r["final_s"] for r in runs),
                    "paused": max(r["paused"] for r in runs),
                }
                results.append(rec)
                hit = next((k for k, a in enumerate(rec["acc"]) if a >= TARGET_ACC), None)  # nan: not scored
                print(
                    f"[overlap tta] seed {seed} {algo}: {steps} steps in {ends[-1]:.1f} s, "
                    f"{'0.95 at step ' + str(hit + 1) if hit is not None else 'no 0.95'}, "
                    f"{'final accuracy ' + format(rec['acc'][-1], '.3f') if s == 0 else 'scored up to it'}",
                    file=sys.stderr,
                    flush=True,
                )
                rec["hit"] = hit
            # later seeds: the steps the first seed needed, plus a sixth (at least 3)
            if s == 0:
                hit = comm.all_gather_object(results[-1]["hit"] if comm.rank == 0 else None)[0]
                if hit is not None:
                    budget[algo] = min(cfg["steps"], hit + 1 + max(3, math.ceil((hit + 1) / 6)))
    if comm.rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    comm.barrier()
    sys.stdout.flush()
    os._exit(0)


# -- the driver ----------------------------------------------------------------------------------------


def span(series: list[list[list[float]]]) -> float:
    """Median over repetitions of (last rank's t1) - (last rank's t0); ``series[rank][rep] = [t0, t1]``."""
    reps = len(series[0])
    return statistics.median(max(s[i][1] for s in series) - max(s[i][0] for s in series) for i in range(reps))


def cluster_run(nodes: int, mode: str, cfg: dict, log, timeout: float = 1800):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        cmd = [
            sys.executable,
            "-m",
            "lookahead_dist.cluster",
            "--nodes",
            str(nodes),
            "--procs-per-node",
            "1",
            "--bandwidth",
            RATE,
            "--no-bandwidth-check",
            "--",
            str(Path(__file__).resolve()),
            "--worker",
            mode,
            "--cfg",
            json.dumps(cfg),
            "--out",
            out,
        ]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, cwd=ROOT, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(out):
            log(f"{mode} on {nodes} nodes: the cluster run failed (exit {proc.returncode})")
            return None
        log(f"{mode} on {nodes} nodes: {time.monotonic() - t0:.0f} s")
        with open(out) as f:
            return json.load(f)


def analyse_steps(ranks: list[dict], nodes: int) -> dict:
    """Per topology: step times, ratios and the cost model's predictions."""
    from lookahead_dist.costmodel import Links, overlapped_step_time, schedule_cost
    from lookahead_dist.topology import load

    r0 = ranks[0]
    con = [r["contention"] for r in ranks]
    alone = span([c["alone"] for c in con])
    both = span([c["both"] for c in con])
    shift = span([c["shift"] for c in con])
    moved = con[0]["bytes"] * min(1.0, both / shift)
    per_byte = max(0.0, both - alone) / moved
    mem = statistics.median(r["memory_bytes_per_s"] for r in ranks)
    copy_s = statistics.median(r["copy_s"] for r in ranks)
    links = Links(1e9, latency_s=0.0, memory_bytes_per_s=mem, allreduce="ring")
    rows = {}
    for name, topo in TOPOLOGIES.items():
        g = [r["groups"][name] for r in ranks]
        n = g[0]["steps"]
        t = {v: span([x["times"][v] for x in g]) / n for v in g[0]["times"]}
        fb = statistics.median(x["fb_s"] for x in g)
        opt = statistics.median(x["opt_s"] for x in g)
        tp = load(dict(topo), world_size=nodes)
        cost = schedule_cost(tp.schedule, tp.placement, g[0]["buffer_bytes"], links, 1)
        contention_s = per_byte * cost.total_bytes
        # the overlapped step's local work beside the combine: the base step and the snapshot copy
        # (push-sum: numerators scaled into the snapshot, de-biased after the step, one pass each)
        extra = opt + copy_s * (2 if tp.push_sum else 1)
        pred_over = overlapped_step_time(fb, cost.comm_s, cost.combine_s + extra, contention_s)
        pred_block = fb + opt + cost.comm_s + cost.combine_s + (copy_s if tp.push_sum else 0.0)
        rows[name] = {
            **t,
            "steps": n,
            "fb": fb,
            "opt": opt,
            "pred_comm": cost.comm_s + cost.combine_s,
            "pred_over": pred_over,
            "pred_block": pred_block,
            "contention_s": contention_s,
            "over_vs_max": t["overlapped"] / max(t["compute"], t["comm"]),
            "speedup": t["blocking"] / t["overlapped"],
            "err_over": pred_over / t["overlapped"] - 1,
            "err_block": pred_block / t["blocking"] - 1,
        }
    return {
        "nodes": nodes,
        "batch": r0["batch"],
        "group_batch": r0["group_batch"],
        "choice": r0["choice"],
        "rows": rows,
        "contention": {"alone": alone, "both": both, "shift": shift, "per_byte": per_byte, "moved": moved},
        "memory_bytes_per_s": mem,
        "copy_s": copy_s,
    }


def steps_table(res: dict) -> str:
    nodes = res["nodes"]
    c = res["contention"]
    per_graph = len(set(res["group_batch"].values())) > 1
    if per_graph:
        what = "batch per worker " + ", ".join(f"{g} {b}" for g, b in res["choice"]["per_graph"].items())
        what += " (each graph's compute equals its communication; DDP at the one-peer graph's)"
    else:
        what = f"batch {res['batch']} per worker " + (
            f"(compute at the geometric mean of ring and one-peer communication, {res['choice']['target']:.3f} s)"
            if res["choice"]["target"] is not None
            else "(given by --batch)"
        )
    lines = [
        f"{nodes} nodes x 1 rank at {RATE}, digits_mlp, {what}",
        f"contention: forward+backward {c['alone']:.3f} s alone, {c['both']:.3f} s beside a shift of "
        f"{c['moved'] / 1e6:.0f} MB (alone {c['shift']:.3f} s): {c['per_byte'] * 1e9:.2f} ns per byte of traffic",
    ]
    head = (
        f"{'topology':<22} {'compute':>8} {'comm':>7} {'blocking':>8} {'overlap':>8} {'ov/max':>7} "
        f"{'speedup':>7} {'pred comm':>9} {'pred ov':>8} {'err':>7} {'pred blk':>8} {'err':>7}"
    )
    lines += [head, "-" * len(head)]
    for name, r in res["rows"].items():
        lines.append(
            f"{name:<22} {r['compute']:>8.3f} {r['comm']:>7.3f} {r['blocking']:>8.3f} {r['overlapped']:>8.3f} "
            f"{r['over_vs_max']:>7.2f} {r['speedup']:>6.2f}x {r['pred_comm']:>9.3f} {r['pred_over']:>8.3f} "
            f"{r['err_over']:>+7.1%} "
            f"{r['pred_block']:>8.3f} {r['err_block']:>+7.1%}"
        )
    g = res["rows"][DDP_GROUP]
    if "ddp" in g:
        lines.append(
            f"DDP step {g['ddp']:.3f} s; overlapped one-peer SGP / DDP = {g['overlapped'] / g['ddp']:.2f}, "
            f"blocking one-peer SGP / DDP = {g['blocking'] / g['ddp']:.2f}"
        )
    return "\n".join(lines)


def planner_taus(nodes: int, compute_s: float, params: int, steps: int, log) -> dict:
    """The planner's tau for local SGD (the fastest blocking step among its local SGD rows that reach
    consensus) and for SlowMo over one-peer exponential gossip (the fastest overlapped step among its
    SlowMo rows), offered the planner's own taus up to half the run (so that a run holds two slow steps)."""
    from lookahead_dist.costmodel import Links
    from lookahead_dist.planner import SLOWMO_TAUS, TAUS, plan_rows, recommend

    cap = max(2, steps // 2)  # taus the run holds at least twice
    rows = plan_rows(
        nodes,
        nodes,
        Links(1e9, allreduce="ring"),
        float(params),
        compute_s=compute_s,
        taus=[t for t in TAUS if t <= cap] or [cap],
        slowmo_taus=[t for t in SLOWMO_TAUS if t <= cap] or [cap],
    )
    local, why_l = recommend([r for r in rows if r.name.startswith("local SGD")])
    slow, why_s = recommend([r for r in rows if r.name.startswith("SlowMo")], overlap=True)
    log(f"planner, local SGD: {why_l}")
    log(f"planner, SlowMo: {why_s}")

    def tau(row):
        return int(row.name.split("tau=")[1].split()[0])

    return {"local": tau(local), "slowmo": tau(slow)}


def analyse_tta(records: list[dict]) -> dict:
    out = {}
    for algo in ALGOS:
        recs = [r for r in records if r["algo"] == algo]
        if not recs:
            continue
        times = []
        for r in recs:
            hit = r["hit"]
            times.append(r["ends"][hit] + (r["final_s"] if algo != "DDP" else 0.0) if hit is not None else math.inf)
        out[algo] = {
            "times": times,
            "median": statistics.median(times),
            "steps": [(r["hit"] + 1 if r["hit"] is not None else None) for r in recs],
            "step_s": statistics.median(r["ends"][-1] / r["steps"] for r in recs),
            "final_s": statistics.median(r["final_s"] for r in recs),
            "paused": max(r["paused"] for r in recs),
        }
    return out


def tta_table(tta: dict, nodes: int, batch: int, taus: dict) -> str:
    ddp = tta.get("DDP", {}).get("median", math.nan)
    lines = [
        f"time to test accuracy {TARGET_ACC} on digits, {nodes} nodes at {RATE}, batch {batch} per worker, "
        f"Adam lr {LR}; local SGD tau = {taus['local']}, SlowMo over SGP tau = {taus['slowmo']} (planner)",
    ]
    head = f"{'algorithm':<20} {'median s':>9} {'/ DDP':>6} {'s/step':>7} {'final avg s':>11}  per seed (s, steps)"
    lines += [head, "-" * len(head)]
    for algo, r in tta.items():
        seeds = ", ".join(
            f"{t:.1f} ({s})" if math.isfinite(t) else "not reached" for t, s in zip(r["times"], r["steps"])
        )
        lines.append(
            f"{algo:<20} {r['median']:>9.2f} {r['median'] / ddp:>6.2f} {r['step_s']:>7.3f} {r['final_s']:>11.3f}  "
            f"{seeds}"
        )
    paused = max(r["paused"] for r in tta.values())
    lines.append(f"snapshot pause per step (clock stopped): at most {paused * 1e3:.1f} ms")
    return "\n".join(lines)


def plot(records: list[dict], tta: dict, path: Path, nodes: int) -> None:
    """Test accuracy and training loss against wall time of the first seed, one line per algorithm; a dot
    where it first reaches 0.95, the median time to 0.95 over the seeds in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = records[0]["seed"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = dict(zip(ALGOS, ["k-", "C0--", "C0-", "C1--", "C1-", "C2-", "C3-", "C4-"]))
    for r in [r for r in records if r["seed"] == seed]:
        style, med = styles.get(r["algo"], "-"), tta[r["algo"]]["median"]
        label = f"{r['algo']} ({med:.1f} s)" if math.isfinite(med) else f"{r['algo']} (not reached)"
        a1.plot(r["ends"], r["acc"], style, label=label, lw=1.5)
        if r["hit"] is not None:
            a1.plot([r["ends"][r["hit"]]], [r["acc"][r["hit"]]], style[:2] + "o", ms=5)
        a2.plot(r["ends"], r["loss"], style, label=r["algo"], lw=1.5)
    a1.axhline(TARGET_ACC, color="grey", lw=0.8, ls=":")
    a1.set_ylim(0.5, 1.0)
    a1.set_xlabel("wall time (s)")
    a1.set_ylabel("test accuracy of the consensus model")
    a2.set_yscale("log")
    a2.set_xlabel("wall time (s)")
    a2.set_ylabel("training loss (mean over workers)")
    a1.legend(fontsize=8, title=f"median time to {TARGET_ACC} over seeds", title_fontsize=8)
    for a in (a1, a2):
        a.grid(alpha=0.3)
    fig.suptitle(f"digits_mlp on {nodes} emulated nodes at {RATE}, seed {seed} (dots: first {TARGET_ACC})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def targets(steps: dict, tta: dict | None) -> list[tuple[str, float, float, str, bool]]:
    out = []

    def add(name, value, bound, op):
        ok = value <= bound if op == "<=" else value >= bound
        out.append((name, value, bound, op, bool(ok)))

    for nodes, res in steps.items():
        for topo, r in res["rows"].items():
            if nodes == 4:
                add(f"{nodes} nodes {topo}: overlapped / max(compute, comm)", r["over_vs_max"], 1.25, "<=")
                add(f"{nodes} nodes {topo}: throughput overlapped / blocking", r["speedup"], 1.5, ">=")
                add(f"{nodes} nodes {topo}: cost model |error|, overlapped", abs(r["err_over"]), 0.20, "<=")
            else:
                add(f"{nodes} nodes {topo}: throughput overlapped / blocking", r["speedup"], 1.25, ">=")
        if nodes == 8 and "ddp" in res["rows"][DDP_GROUP]:
            g = res["rows"][DDP_GROUP]
            add("8 nodes: overlapped one-peer SGP step / DDP step", g["overlapped"] / g["ddp"], 0.75, "<=")
    if tta and "DDP" in tta:
        best = min((r["median"], a) for a, r in tta.items() if a != "DDP")
        add(f"time to 0.95: best decentralized ({best[1]}) / DDP", best[0] / tta["DDP"]["median"], 0.5, "<=")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--nodes", type=int, nargs="*", default=None, help="cluster sizes of the step measurements (default 4 8)"
    )
    p.add_argument("--tta-nodes", type=int, default=4, help="cluster size of the time to accuracy (0: skip)")
    p.add_argument("--reps", type=int, default=5, help="repetitions of every step window (default 5)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the time to accuracy (default 3)")
    p.add_argument("--steps", type=int, default=30, help="steps of the first seed's runs (default 30)")
    p.add_argument(
        "--batch", type=int, default=None, help="batch per worker of the step measurements (default: measured)"
    )
    p.add_argument(
        "--per-graph-batch",
        action="store_true",
        help="each graph at the batch whose compute equals its communication (default: one batch for all, "
        "compute at the geometric mean of ring and one-peer communication)",
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: 4 nodes, 2 repetitions, 1 seed of 6 steps")
    p.add_argument("--plot", default=str(ROOT / "docs" / "img" / "overlap_tta.png"), help="the plot's path")
    p.add_argument("--json", default=None, help="also write every measurement here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cfg", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == "steps":
        steps_worker(json.loads(args.cfg), args.out)
        return 0
    if args.worker == "tta":
        tta_worker(json.loads(args.cfg), args.out)
        return 0
    if os.geteuid() != 0:
        print("bench/overlap.py: the emulated cluster needs root (network namespaces)", file=sys.stderr)
        return 2
    if args.quick:
        args.reps, args.seeds, args.steps = 2, 1, 6
    if args.nodes is None:
        args.nodes = [4] if args.quick else [4, 8]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    t_start = time.monotonic()
    load_before = os.getloadavg()
    steps, failed = {}, False
    for nodes in args.nodes:
        cfg = {"reps": args.reps, "batch": args.batch, "per_graph": args.per_graph_batch}
        ranks = cluster_run(nodes, "steps", cfg, log)
        if ranks is None:
            failed = True
            continue
        steps[nodes] = analyse_steps(ranks, nodes)
        log(steps_table(steps[nodes]))
    tta, records, tta_info = None, [], {}
    if args.tta_nodes:
        nodes = args.tta_nodes
        if nodes in steps:
            batch = steps[nodes]["batch"]
            compute_s = statistics.median(r["compute"] for r in steps[nodes]["rows"].values())
            if len(set(steps[nodes]["group_batch"].values())) > 1:  # the groups ran other batches
                compute_s = compute_at(steps[nodes]["choice"]["compute"], batch)
        else:
            batch, compute_s = 256, 0.35
            log(f"no step measurement at {nodes} nodes: batch {batch}, compute {compute_s} s assumed")
        shard = 1437 // nodes  # a worker's shard of the digits training split (80 % of 1797)
        if batch > shard:
            log(f"batch {batch} is more than a worker's shard ({shard} examples): {shard}")
            batch = shard
        params = sum(p.numel() for p in _model().parameters())
        taus = planner_taus(nodes, compute_s, params, args.steps, log)
        snapdir = tempfile.mkdtemp(prefix="overlap-", dir="/dev/shm")
        try:
            cfg = {
                "batch": batch,
                "taus": taus,
                "seeds": list(range(args.seeds)),
                "steps": args.steps,
                "algos": list(ALGOS),
                "snapdir": snapdir,
            }
            records = cluster_run(nodes, "tta", cfg, log, timeout=3600)
        finally:
            shutil.rmtree(snapdir, ignore_errors=True)
        if records is None:
            failed, records = True, []
        else:
            tta = analyse_tta(records)
            tta_info = {"nodes": nodes, "batch": batch, "taus": taus}
            plot(records, tta, Path(args.plot), nodes)
    print(f"bench/overlap.py{' --quick' if args.quick else ''}: every ratio below is measured in one run")
    for res in steps.values():
        print(steps_table(res))
        print()
    if tta:
        print(tta_table(tta, tta_info["nodes"], tta_info["batch"], tta_info["taus"]))
        print(f"plot: {args.plot}")
        print()
    checks = targets(steps, tta)
    print("targets:")
    for name, value, bound, op, ok in checks:
        print(f"  {'met   ' if ok else 'MISSED'} {name}: {value:.3f} (target {op} {bound})")
    if 8 in steps:
        errs = ", ".join(f"{t} {r['err_over']:+.1%}" for t, r in steps[8]["rows"].items())
        print(f"cost model error at 8 nodes, overlapped: {errs}")
    print(f"load average before (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in load_before)}")
    print(
        f"load average after (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())} on "
        f"{os.cpu_count()} cores; {args.reps} repetitions; {time.monotonic() - t_start:.0f} s in all"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": steps, "tta": tta, "tta_info": tta_info, "records": records}, f)
    return 0 if not failed and all(c[-1] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
