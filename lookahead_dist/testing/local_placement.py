"""Every agent of a topology on one rank: the engine's local path against the float64 reference.

Shared by tests/test_local_placement.py (CPU, gloo) and tests/test_gpu.py (CUDA,
NCCL): the two differ only in the device and the backend of the one-rank
process group. Each agent is its own model (float64, on the device) whose
parameters are views of flat buffers registered with
:class:`~lookahead_dist.engine.MixingEngine`; fast agents own an SGD with
momentum, slow agents no optimizer. Placing every agent on rank 0 makes every
block of every P_k a local weighted sum (no all-reduce, no exchange), which is
checked, and the models are compared at every step with
:class:`~lookahead_dist.reference.simulate.Reference` on the CPU in float64.

Push-sum follows the rule of :class:`~lookahead_dist.decentralized.Decentralized`:
the push-sum weight is one trailing element of the agent's buffer, the model
holds z = x / w between steps, the base update is subtracted from the
numerator x = z w, then the numerators and weights are mixed.
"""

from __future__ import annotations

import copy
import glob
import os
from contextlib import contextmanager

import torch
import yaml

from lookahead_dist import comm as comm_mod
from lookahead_dist.comm import Comm
from lookahead_dist.engine import MixingEngine
from lookahead_dist.errors import TopologyError
from lookahead_dist.flat import flatten_module
from lookahead_dist.reference.problems import tiny_regression
from lookahead_dist.reference.simulate import Reference
from lookahead_dist.testing.verify import SEED, flat_model, sgd
from lookahead_dist.topology import Topology, from_mapping, load

TOPOLOGIES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "topologies")
SHIPPED = sorted(os.path.basename(p) for p in glob.glob(os.path.join(TOPOLOGIES, "*.yaml")))
STEPS = 12
TOL = 1e-10
DEFAULT_AGENTS = 4  # for files whose generator takes its size from the world size


@contextmanager
def one_rank_group(backend: str):
    """A process group of world size 1 in this process (:func:`lookahead_dist.comm.init_single_process_group`),
    destroyed on exit; an error, not a silent reuse, when a group already exists."""
    if comm_mod.is_initialized():
        raise RuntimeError("a process group is already initialised in this process")
    if backend == "nccl":
        torch.cuda.set_device(0)
    comm_mod.init_single_process_group(backend, timeout_s=60.0)
    try:
        yield
    finally:
        comm_mod.destroy_process_group()


def all_on_one_rank(name: str) -> Topology:
    """The shipped topology ``name`` with its placement overridden to all zeros."""
    path = os.path.join(TOPOLOGIES, name)
    try:
        n = load(path).n
    except TopologyError:  # sized by the world size: ring, complete, ...
        n = load(path, world_size=DEFAULT_AGENTS).n
    with open(path) as f:
        mapping = yaml.safe_load(f)
    mapping.setdefault("name", os.path.splitext(name)[0])
    mapping["placement"] = [0] * n
    return from_mapping(mapping, source=f"{path} (every agent on rank 0)", world_size=1)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def run_all_on_one_rank(name: str, device: torch.device, steps: int = STEPS, overlap: bool = False) -> float:
    """Run ``name`` with every agent on this (only) rank on ``device``; the largest deviation from the reference.

    ``overlap``: the overlapped path, :meth:`MixingEngine.start` from snapshots before the forward and
    :meth:`MixingEngine.finish` after it, then the base step (combine-then-adapt, as
    :class:`~lookahead_dist.decentralized.Decentralized` with ``overlap=True``), against the reference in
    that order.

    Must run inside a one-rank process group (:func:`one_rank_group`). Asserts
    that the engine compiled only local arithmetic and that every flat buffer
    lives on ``device``.
    """
    device = torch.device(device)
    topo = all_on_one_rank(name)
    prob = tiny_regression(topo.n, SEED)
    comm = Comm(heartbeat=0)
    try:
        engine = MixingEngine(topo.schedule, topo.placement, comm, source=topo.source)
        assert all(not p.allreduces and p.exchange is None for p in engine.plans), engine.describe()
        assert any(p.local is not None for p in engine.plans), engine.describe()
        models, opts, values = {}, {}, {}
        for a in range(topo.n):
            model = copy.deepcopy(prob.module).to(device)
            flat = flatten_module(model, weight_slot=topo.push_sum)
            engine.add_agent(a, flat.tensors())
            models[a] = model
            values[a] = flat.values()
            if topo.roles[a] == "fast":
                opts[a] = sgd(model.parameters())
        for bufs in engine.agents.values():
            for b in bufs:
                assert b.device == device, f"a flat buffer is on {b.device}, not {device}"
        for a, model in models.items():
            base = engine.agents[a][0].data_ptr()
            end = base + engine.agents[a][0].numel() * engine.agents[a][0].element_size()
            assert all(base <= p.data_ptr() < end for p in model.parameters()), "parameters are not views"

        order = "combine_then_adapt" if overlap else "adapt_then_combine"
        trace = Reference(topo.schedule, topo.roles, prob.x0, prob, sgd, record_every=1, order=order).run(steps)
        snaps = {a: [torch.empty_like(b) for b in bufs] for a, bufs in engine.agents.items()}

        def worst_at(k: int) -> float:
            return max(_rel_err(flat_model(m).cpu(), trace.X[k][a]) for a, m in models.items())

        worst = worst_at(0)
        for k in range(steps):
            if overlap:
                with torch.no_grad():
                    for a, bufs in engine.agents.items():  # snapshot the numerators x = z w
                        w = float(bufs[0][-1]) if topo.push_sum else 1.0
                        for dst, src in zip(snaps[a], bufs):
                            torch.mul(src, w, out=dst)
                        if topo.push_sum:
                            snaps[a][0][-1] = w
                    inflight = engine.start(k, snaps)
            for a, opt in opts.items():
                opt.zero_grad()
                inputs, targets = prob.data_fn(a, k)
                torch.nn.functional.mse_loss(models[a](inputs.to(device)), targets.to(device)).backward()
            if overlap:
                with torch.no_grad():
                    engine.finish(inflight)  # the agents hold the mixed numerators
                    for opt in opts.values():
                        opt.step()
                    for a in models if topo.push_sum else ():
                        w = float(engine.agents[a][0][-1])
                        for v in values[a]:
                            v.div_(w)
                worst = max(worst, worst_at(k + 1))
                continue
            with torch.no_grad():
                weights = {a: float(engine.agents[a][0][-1]) for a in models} if topo.push_sum else {}
                for a, w in weights.items():  # model z -> numerator x = z w
                    for v in values[a]:
                        v.mul_(w)
                for opt in opts.values():
                    opt.step()
                engine.mix(k)
                for a in weights:  # numerator -> model z = x / w
                    w = float(engine.agents[a][0][-1])
                    for v in values[a]:
                        v.div_(w)
            worst = max(worst, worst_at(k + 1))
        return worst
    finally:
        comm.close()
