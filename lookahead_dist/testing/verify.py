"""Check a topology on this machine before a GPU run: distributed engine vs the float64 reference.

    python -m lookahead_dist.verify my_topology.yaml --nproc 4

spawns ``--nproc`` gloo processes on the CPU, trains a small float64 model
(:func:`lookahead_dist.reference.problems.tiny_regression`, SGD with momentum) on the
topology with :class:`~lookahead_dist.decentralized.Decentralized`, replays the
same seeds and data in the single-process reference engine
(:class:`~lookahead_dist.reference.simulate.Reference`) and prints the largest deviation
per step. A second run with learning rate 0 from perturbed starting points
measures the consensus rate and prints it beside the predicted one. The exit
status is 0 when every deviation is within ``--tol`` and the measured rate is
no worse than predicted, 1 otherwise, 2 for an invalid topology.
"""

from __future__ import annotations

import copy
import sys

import torch

from lookahead_dist.flat import without_weight
from lookahead_dist.reference.problems import flatten_params as flat_model  # the model's parameters as one vector

SEED = 3
LR = 0.05
MOMENTUM = 0.9

__all__ = ["flat_model", "verify", "train_rank"]


def make_problem(n_agents: int, seed: int = SEED):
    from lookahead_dist.reference.problems import tiny_regression

    return tiny_regression(n_agents, seed)


def sgd(params, lr: float = LR):
    return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM)


def perturbed_start(prob, agent: int, perturb: float) -> torch.Tensor:
    """Agent ``agent``'s own starting point: the problem's x0 plus a seeded perturbation."""
    from lookahead_dist.reference.problems import rng

    noise = torch.randn(prob.d, generator=rng(SEED, "perturb", agent), dtype=torch.float64)
    return prob.x0 + perturb * noise


def train_rank(rank, topology, steps, lr=LR, comm=None, record=False, perturb=0.0, overlap=False):
    """One rank of a :class:`Decentralized` run on the tiny regression problem (``overlap``: overlapped,
    in combine-then-adapt order).

    Returns {"agent": this rank's fast agent or None, "final": flat params,
    "hist": flat params after each step (with ``record``), "agents": every local
    agent's flat buffers, "weight": push-sum weight, "bytes": bytes sent,
    "finalized": the params after ``finalize()``}.
    """
    from lookahead_dist import comm as comm_mod
    from lookahead_dist.decentralized import Decentralized, run_passive
    from lookahead_dist.topology import load

    topo = topology if hasattr(topology, "schedule") else load(topology, world_size=comm_mod.world_size())
    prob = make_problem(topo.n)
    model = copy.deepcopy(prob.module)
    if perturb:
        torch.nn.utils.vector_to_parameters(perturbed_start(prob, topo.agents_on(rank)[0], perturb), model.parameters())
    opt = Decentralized(sgd(model.parameters(), lr), model, topo, comm=comm, overlap=overlap)

    def snapshot():  # each local agent's parameters (the first flat group), without the push-sum weight
        return {a: without_weight(bufs, topo.push_sum)[0].clone() for a, bufs in opt.engine.agents.items()}

    hist = [flat_model(model)] if record else []
    agent_hist = [snapshot()] if record else []
    agent = opt.fast_agent
    if agent is None and not record:
        run_passive(opt, steps)
    else:
        for k in range(steps):
            if agent is not None:
                opt.zero_grad()
                inputs, targets = prob.data_fn(agent, k)
                torch.nn.functional.mse_loss(model(inputs), targets).backward()
            opt.step()
            if record:
                hist.append(flat_model(model))
                agent_hist.append(snapshot())
    out = {
        "agent": agent,
        "final": flat_model(model),
        "hist": hist,
        "agent_hist": agent_hist,
        "bytes": opt.bytes_sent,
        "agents": {a: [b.clone() for b in bufs] for a, bufs in opt.engine.agents.items()},
        "weight": opt.weight,
    }
    opt.finalize()
    out["finalized"] = flat_model(model)
    return out


def _verify_worker(rank, world, source, steps, lr, perturb):
    from lookahead_dist.comm import Comm
    from lookahead_dist.topology import load

    comm = Comm()
    topo = load(source, world_size=world)
    train = train_rank(rank, topo, steps, lr=lr, comm=comm, record=True)
    still = train_rank(rank, topo, steps, lr=0.0, comm=comm, record=True, perturb=perturb)
    comm.close()
    return {"train": train, "consensus": still}


def reference_models(topo, steps, lr=LR, perturb=0.0, order="adapt_then_combine"):
    """The reference engine's de-biased models (n, d) at every step 0..steps."""
    from lookahead_dist.reference.simulate import Reference

    prob = make_problem(topo.n)
    x0 = torch.stack([perturbed_start(prob, a, perturb) for a in range(topo.n)]) if perturb else prob.x0
    ref = Reference(topo.schedule, topo.roles, x0, prob, lambda p: sgd(p, lr), record_every=1, order=order)
    trace = ref.run(steps)
    return [trace.X[k] for k in range(steps + 1)]


def deviations(topo, per_rank, ref_models, key="train"):
    """Largest relative deviation max|a - b| / max(1, max|b|) over the fast agents, per step."""
    out = []
    for k, ref in enumerate(ref_models):
        worst = 0.0
        scale = max(1.0, float(ref.abs().max()))
        for res in per_rank:
            r = res[key]
            if r["agent"] is not None:
                worst = max(worst, float((r["hist"][k] - ref[r["agent"]]).abs().max()) / scale)
        out.append(worst)
    return out


def consensus_distances(topo, per_rank, key="consensus"):
    """||Z_k - z_inf 1^T||_F per step of the lr = 0 run, Z_k every agent's (de-biased) model.

    z_inf is the value consensus reaches: Z_k a for a column-stochastic schedule
    (invariant at lr 0, paper eq. 8), the mean of the initial models for push-sum.
    """
    steps = len(per_rank[0][key]["agent_hist"])
    Z = torch.stack(
        [
            torch.stack(
                [
                    next(res[key]["agent_hist"][k][a] for res in per_rank if a in res[key]["agent_hist"][k])
                    for a in range(topo.n)
                ]
            )
            for k in range(steps)
        ]
    )  # (steps+1, n, d)
    if topo.push_sum:
        limit = Z[0].mean(0).expand_as(Z[:, 0])
    else:
        a = torch.tensor(topo.schedule.invariant_vector(), dtype=torch.float64)
        limit = torch.einsum("kid,i->kd", Z, a)
    return (Z - limit[:, None]).flatten(1).norm(dim=1).tolist()


def measured_rate(dist, period: int) -> float:
    """Per-step contraction over the last two whole periods (0 when consensus is already exact)."""
    k1 = (len(dist) - 1) - (len(dist) - 1) % period
    k0 = k1 - 2 * period
    if k0 < 0:
        k0 = 0
    if dist[0] == 0 or dist[k1] <= 1e-13 * dist[0]:
        return 0.0
    return (dist[k1] / dist[k0]) ** (1.0 / (k1 - k0))


def verify(
    source, nproc: int, steps: int = 20, lr: float = LR, tol: float = 1e-10, perturb: float = 1.0, out=None
) -> bool:
    """Run the check and print the report (to ``out``, default stdout); True when it passes."""
    out = out if out is not None else sys.stdout
    from lookahead_dist.testing.spawn import spawn
    from lookahead_dist.topology import load

    topo = load(source, world_size=nproc)
    sched = topo.schedule
    steps = max(steps, 3 * sched.period)
    print(
        f"{topo.name} ({topo.source}): {topo.n} agents on {nproc} ranks, period {sched.period}, "
        f"push-sum: {'yes' if topo.push_sum else 'no'}; {steps} steps of SGD (lr {lr}) on a "
        f"{make_problem(topo.n).d}-parameter float64 model",
        file=out,
    )
    per_rank = spawn(_verify_worker, nproc, source if isinstance(source, dict) else str(source), steps, lr, perturb)
    dev = deviations(topo, per_rank, reference_models(topo, steps, lr))
    print("step  largest deviation from the reference (relative)", file=out)
    for k, d in enumerate(dev):
        print(f"{k:4d}  {d:.3e}", file=out)
    ok = max(dev) <= tol
    print(f"largest deviation {max(dev):.3e} (tolerance {tol:g}): {'ok' if ok else 'FAILED'}", file=out)
    dist_ = consensus_distances(topo, per_rank)
    predicted = sched.consensus_rate(per_step=True)
    seen = measured_rate(dist_, sched.period)
    rate_ok = seen <= predicted * 1.1 + 1e-9
    print(
        f"consensus with lr 0: distance {dist_[0]:.3e} -> {dist_[-1]:.3e}; rate per step measured {seen:.4f}, "
        f"predicted {predicted:.4f}: {'ok' if rate_ok else 'FAILED'}",
        file=out,
    )
    return ok and rate_ok
