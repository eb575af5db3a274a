"""The distributed engine on GPUs (NCCL, one rank per GPU) against the CPU float64 reference.

    torchrun --standalone --nproc_per_node=G bench/nccl_equivalence.py
    torchrun --standalone --nproc_per_node=4 bench/nccl_equivalence.py --backend gloo   # the same on CPUs

Every rank trains the tiny float64 regression model
(:func:`lookahead_dist.reference.problems.tiny_regression`, SGD with momentum, the
settings of :mod:`lookahead_dist.verify`) with
:class:`~lookahead_dist.decentralized.Decentralized` on CUDA float64 tensors, for
each of: ring gossip, the one-peer exponential graph and directed push-sum.
The shipped directed_push_sum.yaml is for 4 ranks; on another world size G the
same construction is used (the directed cycle 0 -> 1 -> ... -> G-1 -> 0 plus
the chord 0 -> 2; for G = 2 a weighted pair). The models of every step are
gathered and compared with the single-process reference
(:func:`lookahead_dist.verify.reference_models`,
:func:`lookahead_dist.verify.deviations`); the largest relative deviation must
be within --tol (default 1e-10). Exit status 0 when every topology passes.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
TOPOLOGIES = os.path.join(ROOT, "topologies")


def directed_push_sum(world: int):
    """directed_push_sum.yaml for 4 ranks; the same construction (non-regular, push-sum) for another world size."""
    if world == 4:
        return os.path.join(TOPOLOGIES, "directed_push_sum.yaml")
    if world == 2:
        edges = [{"from": 0, "to": 1, "weight": 0.3}, {"from": 1, "to": 0, "weight": 0.6}]
    else:
        edges = [[i, (i + 1) % world] for i in range(world)] + [[0, 2]]
    return {"name": f"directed_push_sum_{world}", "nodes": world, "edges": edges, "push_sum": True}


def topologies(world: int) -> dict:
    return {
        "ring": os.path.join(TOPOLOGIES, "ring.yaml"),
        "one_peer_exponential": os.path.join(TOPOLOGIES, "one_peer_exponential.yaml"),
        "directed_push_sum": directed_push_sum(world),
    }


def train_on_device(topo, steps: int, device: torch.device, comm, overlap: bool = False) -> dict:
    """This rank's run: the fast agent's flat parameters (on the CPU) after every step (``overlap``: the
    exchange runs on the backend's stream behind the next forward and backward, combine-then-adapt)."""
    from lookahead_dist.decentralized import Decentralized
    from lookahead_dist.testing.verify import flat_model, make_problem, sgd

    prob = make_problem(topo.n)
    model = copy.deepcopy(prob.module).to(device)
    opt = Decentralized(sgd(model.parameters()), model, topo, comm=comm, overlap=overlap)
    on_device = all(b.device == device for bufs in opt.engine.agents.values() for b in bufs)
    agent = opt.fast_agent
    hist = [flat_model(model).cpu()]
    for k in range(steps):
        if agent is not None:
            opt.zero_grad()
            inputs, targets = prob.data_fn(agent, k)
            torch.nn.functional.mse_loss(model(inputs.to(device)), targets.to(device)).backward()
        opt.step()
        hist.append(flat_model(model).cpu())
    return {"agent": agent, "hist": hist, "on_device": on_device, "bytes": opt.bytes_sent}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("nccl", "gloo"), default="nccl")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tol", type=float, default=1e-10)
    args = ap.parse_args(argv)
    if "RANK" not in os.environ:
        ap.error("launch with torchrun --nproc_per_node=G (one rank per GPU)")
    from lookahead_dist.comm import Comm, destroy_process_group, init_process_group
    from lookahead_dist.testing.verify import deviations, reference_models
    from lookahead_dist.topology import load

    init_process_group(args.backend)
    ok = True
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", torch.cuda.current_device()) if args.backend == "nccl" else torch.device("cpu")
        comm = Comm()
        if rank == 0:
            print(f"{world} ranks, backend {args.backend}, float64 on {device.type}; tolerance {args.tol:g}")
        runs = [(name, source, overlap) for overlap in (False, True) for name, source in topologies(world).items()]
        for name, source, overlap in runs:
            topo = load(source, world_size=world)
            steps = max(args.steps, 3 * topo.schedule.period)
            mine = train_on_device(topo, steps, device, comm, overlap)
            per_rank = [None] * world
            dist.all_gather_object(per_rank, mine)
            order = "combine_then_adapt" if overlap else "adapt_then_combine"
            dev = deviations(topo, [{"train": r} for r in per_rank], reference_models(topo, steps, order=order))
            name = name + (" (overlap)" if overlap else "")
            placed = all(r["on_device"] for r in per_rank)
            passed = max(dev) <= args.tol and placed
            ok &= passed
            if rank == 0:
                print(
                    f"{name:32} {topo.n} agents, push-sum {'yes' if topo.push_sum else 'no '}, {steps} steps: "
                    f"largest deviation {max(dev):.3e}, buffers on {device.type}: {'yes' if placed else 'NO'} "
                    f"-> {'ok' if passed else 'FAILED'}",
                    flush=True,
                )
        comm.close()
        dist.barrier()  # nobody tears the group down while a peer still reads
    finally:
        destroy_process_group()
    if int(os.environ["RANK"]) == 0:
        print("nccl equivalence: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
