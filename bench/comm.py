"""Time of one mixing step against the least its communication can cost, and the bytes each rank sends.

Four ranks (gloo on the CPU by default) hold a float32 model of many tensors
(default: 110 Linear layers of width 304, 220 tensors, 10.2M parameters). One
repetition times every variant once, in an order rotated by one each
repetition and reversed every other cycle; a variant's time is barrier, t0,
one step, t1 on every rank, and the repetition's time is the largest over the
ranks. The table gives the median over repetitions and, per variant, the
median of its ratio to its floor measured in the same repetition (and the
ratio of the medians):

* averaging: the engine on topologies/complete.yaml (P = J / n: one weighted
  all-reduce of the flat buffer) against one raw ``dist.all_reduce`` of a
  flat buffer of the same bytes; torch's
  ``PeriodicModelAverager(period=1, warmup_steps=0).average_parameters`` on
  the same model is timed beside it (it concatenates the parameters into a
  fresh buffer, divides, all-reduces it and re-points the parameters at it);
* gossip: the engine on topologies/ring.yaml against one raw
  ``dist.batch_isend_irecv`` of single flat buffers with the same peers plus
  the weighted combine ``x.mul_(w_self); x.add_(recv, alpha=w)``.

Then, for every shipped topology that runs on this world size, the bytes each
rank sends per mixing step, averaged over one period, as counted by the
engine, next to the minimum that the matrices allow (out-degree in ranks x
buffer bytes for an exchange, 2 (p - 1) / p x buffer bytes for an all-reduce
over p ranks), and asserts that they are equal.

    python bench/comm.py [--reps 21] [--layers 110] [--width 304]
    torchrun --nproc_per_node=G bench/comm.py --backend nccl     # one rank per GPU
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from benchutil import rotation  # noqa: E402

TOPOLOGIES = os.path.join(ROOT, "topologies")

TARGETS = {"engine all-reduce (complete)": 1.10, "engine gossip (ring)": 1.15}


def make_model(layers: int, width: int, device: torch.device, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    return model.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peers(P: np.ndarray, rank: int) -> tuple[list[int], list[tuple[int, float]], float]:
    """(ranks this agent sends to, (rank, weight) it receives from, its own weight), one agent per rank."""
    n = P.shape[0]
    out = [j for j in range(n) if j != rank and P[rank, j] != 0.0]
    inn = [(i, float(P[i, rank])) for i in range(n) if i != rank and P[i, rank] != 0.0]
    return out, inn, float(P[rank, rank])


def minimum_bytes(topo, rank: int, buffer_bytes: int, k: int) -> int:
    """The least ``rank`` must send for P_k, from the matrix alone.

    For each connected block of P_k that spans several ranks and holds one of
    this rank's agents: an exact average (all receiving columns equal) over p
    ranks costs 2 (p - 1) / p buffers (a bandwidth-optimal all-reduce); any other
    block costs, for each local agent, one buffer per other rank that takes
    weight from it (its out-degree in ranks).
    """
    from lookahead_dist.plan import components

    P = topo.schedule.phases[topo.schedule.phase_index(k)].matrix
    mine = {i for i, r in enumerate(topo.placement) if r == rank}
    total = 0
    for comp in components(P):
        ranks = {topo.placement[i] for i in comp}
        if not mine & set(comp) or len(ranks) == 1:
            continue
        if all(np.array_equal(P[:, j], P[:, comp[0]]) for j in comp):
            p = len(ranks)
            total += (2 * (p - 1) * buffer_bytes) // p
        else:
            for i in mine & set(comp):
                out = {topo.placement[j] for j in np.flatnonzero(P[i]) if topo.placement[j] != rank}
                total += len(out) * buffer_bytes
    return total


def worker(rank: int, world: int, cfg: dict) -> dict:
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

    from lookahead_dist.comm import Comm
    from lookahead_dist.decentralized import Decentralized
    from lookahead_dist.errors import TopologyError
    from lookahead_dist.topology import load

    torch.set_num_threads(1)
    device = torch.device("cuda", torch.cuda.current_device()) if cfg["backend"] == "nccl" else torch.device("cpu")
    comm = Comm(heartbeat=0)

    def decentralized(name: str):
        model = make_model(cfg["layers"], cfg["width"], device)
        topo = load(os.path.join(TOPOLOGIES, name), world_size=world)
        opt = Decentralized(torch.optim.SGD(model.parameters(), lr=0.0), model, topo, comm=comm)
        return opt, topo

    complete, _ = decentralized("complete.yaml")
    ring, ring_topo = decentralized("ring.yaml")
    numel = complete.engine.buffer_bytes() // 4
    n_tensors = len(list(complete.model.parameters()))

    flat = torch.randn(numel, device=device)
    averager_model = make_model(cfg["layers"], cfg["width"], device)
    for p in averager_model.parameters():  # it averages only parameters that have a gradient
        p.grad = torch.zeros_like(p)
    with warnings.catch_warnings():  # "with period 1, use DDP": here it is the point of comparison
        warnings.simplefilter("ignore", UserWarning)
        averager = PeriodicModelAverager(period=1, warmup_steps=0)

    gossip_x = torch.randn(numel, device=device)
    out_peers, in_peers, w_self = _peers(ring_topo.schedule.phases[0].matrix, rank)
    gossip_recv = {i: torch.empty_like(gossip_x) for i, _ in in_peers}

    def floor_gossip(k):
        ops = [dist.P2POp(dist.isend, gossip_x, j) for j in out_peers]
        ops += [dist.P2POp(dist.irecv, gossip_recv[i], i) for i, _ in in_peers]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        gossip_x.mul_(w_self)
        for i, w in in_peers:
            gossip_x.add_(gossip_recv[i], alpha=w)

    variants = {
        "floor all-reduce": lambda k: dist.all_reduce(flat),
        "engine all-reduce (complete)": complete.engine.mix,
        "torch PeriodicModelAverager": lambda k: averager.average_parameters(averager_model.parameters()),
        "floor gossip": floor_gossip,
        "engine gossip (ring)": ring.engine.mix,
    }
    names = list(variants)
    times = {name: [] for name in names}
    with torch.no_grad():
        for rep in range(cfg["warmup"] + cfg["reps"]):
            for name in rotation(names, rep):
                flat.mul_(1.0 / world)  # keep the summed buffer bounded; outside the timed region
                dist.barrier()
                _sync(device)
                t0 = time.perf_counter()
                variants[name](rep)
                _sync(device)
                times[name].append(time.perf_counter() - t0)

    # Bytes per mixing step, averaged over one period, for every shipped topology that fits this world size.
    traffic = {}
    for path in sorted(glob.glob(os.path.join(TOPOLOGIES, "*.yaml"))):
        name = os.path.basename(path)
        try:
            topo = load(path, world_size=world)
        except TopologyError:
            try:
                needs = f"runs on {load(path).world_size} ranks"
            except TopologyError:
                needs = "needs another world size"
            traffic[name] = {"skipped": f"{needs}, this run has {world}"}
            continue
        model = make_model(cfg["layers"], cfg["width"], device)
        opt = Decentralized(torch.optim.SGD(model.parameters(), lr=0.0), model, topo, comm=comm)
        period = topo.schedule.period
        with torch.no_grad():
            for k in range(period):
                opt.engine.mix(k)
        buf = opt.engine.buffer_bytes()
        traffic[name] = {
            "engine": opt.bytes_sent,
            "minimum": sum(minimum_bytes(topo, rank, buf, k) for k in range(period)),
            "period": period,
            "buffer": buf,
        }
        del opt, model
    comm.close()
    ring_plan = ring.engine.plan(0)
    return {
        "times": times,
        "traffic": traffic,
        "numel": numel,
        "tensors": n_tensors,
        "ring_is_allreduce": bool(ring_plan.allreduces) and ring_plan.exchange is None,
    }


def report(results: list[dict], cfg: dict) -> bool:
    world = len(results)
    first = results[0]
    names = list(first["times"])
    reps = cfg["reps"]
    # per repetition: the slowest rank
    per_rep = {n: [max(r["times"][n][cfg["warmup"] + i] for r in results) for i in range(reps)] for n in names}
    floors = {
        "engine all-reduce (complete)": "floor all-reduce",
        "torch PeriodicModelAverager": "floor all-reduce",
        "engine gossip (ring)": "floor gossip",
    }
    print(
        f"{world} ranks ({cfg['backend']}), model: {first['tensors']} tensors, {first['numel'] / 1e6:.2f}M float32 "
        f"parameters ({first['numel'] * 4 / 2**20:.1f} MiB); median of {reps} interleaved repetitions, "
        f"time of one step = slowest rank"
    )
    print(f"{'variant':32} {'median ms':>10} {'vs floor':>9} {'(medians)':>10} {'target':>8}")
    ok = True
    for n in names:
        med = 1e3 * statistics.median(per_rep[n])
        line = f"{n:32} {med:10.2f}"
        if n in floors:
            # the ratio within each repetition (side by side), then its median; and the ratio of the medians
            ratio = statistics.median(a / b for a, b in zip(per_rep[n], per_rep[floors[n]]))
            line += f" {ratio:9.3f} {statistics.median(per_rep[n]) / statistics.median(per_rep[floors[n]]):10.3f}"
            if n in TARGETS:
                met = ratio <= TARGETS[n]
                ok &= met
                line += f" {'<= %.2f' % TARGETS[n]:>8} {'met' if met else 'MISSED'}"
        print(line)
    if first["ring_is_allreduce"]:
        print(f"(on {world} ranks the ring's matrix is an exact average: the engine runs it as one all-reduce)")
    faster = statistics.median(
        a / b for a, b in zip(per_rep["engine all-reduce (complete)"], per_rep["torch PeriodicModelAverager"])
    )
    print(
        f"engine all-reduce / torch PeriodicModelAverager (same repetition): {faster:.3f} "
        f"({'faster' if faster < 1 else 'NOT faster'})"
    )
    ok &= faster < 1

    print()
    buf_mib = next((t["buffer"] for t in first["traffic"].values() if "buffer" in t), 0) / 2**20
    print(
        f"bytes sent per rank per mixing step, averaged over one period, in buffers of {buf_mib:.2f} MiB "
        f"(one agent's flat buffer; push-sum adds one element for its weight)"
    )
    print(f"{'topology':26} {'period':>6}  {'engine, rank 0..' + str(world - 1):40} {'minimum':30} equal")
    all_equal = True
    for name, t in first["traffic"].items():
        if "skipped" in t:
            print(f"{name:26} skipped: {t['skipped']}")
            continue
        buf, period = t["buffer"], t["period"]
        eng = [r["traffic"][name]["engine"] / period / buf for r in results]
        mins = [r["traffic"][name]["minimum"] / period / buf for r in results]
        equal = all(r["traffic"][name]["engine"] == r["traffic"][name]["minimum"] for r in results)
        all_equal &= equal
        print(
            f"{name:26} {period:6d}  {' '.join(f'{x:.3f}' for x in eng):40} "
            f"{' '.join(f'{x:.3f}' for x in mins):30} {'yes' if equal else 'NO'}"
        )
    assert all_equal, "the engine sends more than the minimum for some topology"
    print()
    print("targets " + ("met" if ok else "NOT met") + " (vs floor: median over repetitions of the ratio within one)")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    ap.add_argument("--nproc", type=int, default=4, help="ranks to spawn (gloo without torchrun)")
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layers", type=int, default=110)
    ap.add_argument("--width", type=int, default=304)
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed (default: report only)")
    args = ap.parse_args(argv)
    cfg = {k: getattr(args, k) for k in ("backend", "reps", "warmup", "layers", "width")}
    if "RANK" in os.environ:  # under torchrun: this process is one rank
        from lookahead_dist.comm import destroy_process_group, init_process_group

        init_process_group(args.backend)
        try:
            dist_rank = dist.get_rank()
            res = worker(dist_rank, dist.get_world_size(), cfg)
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, res)
            dist.barrier()  # nobody tears the group down while a peer still reads
        finally:
            destroy_process_group()
        met = report(gathered, cfg) if dist_rank == 0 else True
        return 0 if met or not args.strict else 1
    if args.backend == "nccl":
        ap.error("--backend nccl runs one rank per GPU: launch with torchrun --nproc_per_node=G")
    from lookahead_dist.testing.spawn import spawn

    results = spawn(worker, args.nproc, cfg, timeout=1200.0, op_timeout=300.0)
    return 0 if report(results, cfg) or not args.strict else 1


if __name__ == "__main__":
    sys.exit(main())
