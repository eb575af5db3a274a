"""Code that runs inside spawned ranks (imported by the children, so kept free of pytest)."""

from __future__ import annotations

import copy
import os
import time

import torch

from lookahead_dist.testing.verify import LR, MOMENTUM, SEED, flat_model, make_problem, perturbed_start, sgd, train_rank

TOPOLOGIES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "topologies")
__all__ = ["LR", "MOMENTUM", "SEED", "TOPOLOGIES", "flat_model", "make_problem", "perturbed_start", "sgd"]


def many_topologies(rank, world, names, steps, lr, perturb=0.0, overlap=False):
    """Run each named shipped topology in turn on the same process group."""
    from lookahead_dist.comm import Comm

    comm = Comm()
    results = {}
    for name in names:
        path = name if os.path.isabs(name) else os.path.join(TOPOLOGIES, name)
        results[name] = train_rank(rank, path, steps, lr=lr, comm=comm, record=True, perturb=perturb, overlap=overlap)
    comm.close()
    return results


def several_agents_per_rank(rank, world, mapping, steps, lr):
    """Several fast agents per rank driven through the engine directly (one model and optimizer per agent)."""
    from lookahead_dist.comm import Comm
    from lookahead_dist.engine import MixingEngine
    from lookahead_dist.flat import flatten_module
    from lookahead_dist.topology import from_mapping

    topo = from_mapping(mapping, world_size=world)
    comm = Comm()
    engine = MixingEngine(topo.schedule, topo.placement, comm, source=topo.source)
    prob = make_problem(topo.n)
    agents = {}
    for a in topo.agents_on(rank):
        model = copy.deepcopy(prob.module)
        engine.add_agent(a, flatten_module(model).tensors())
        agents[a] = (model, sgd(model.parameters(), lr))
    for k in range(steps):
        for a, (model, opt) in agents.items():
            opt.zero_grad()
            inputs, targets = prob.data_fn(a, k)
            torch.nn.functional.mse_loss(model(inputs), targets).backward()
            opt.step()
        engine.mix(k)
    comm.close()
    return {a: flat_model(m) for a, (m, _) in agents.items()}


def failures(rank, world, kill_rank, kill_step):
    """World-size mismatch, schedule mismatch and a killed peer, in that order, on one group."""
    from lookahead_dist.comm import Comm
    from lookahead_dist.errors import CommError, TopologyError

    out = {}
    comm = Comm(heartbeat=0.2)
    # 1. a file for 4 ranks on a group of `world`.
    try:
        train_rank(rank, os.path.join(TOPOLOGIES, "time_varying.yaml"), 2, comm=comm)
        out["world"] = "no error"
    except (TopologyError, CommError) as exc:
        out["world"] = f"{type(exc).__name__}: {exc}"
    # 2. rank 0 loads another schedule than the others.
    name = "complete.yaml" if rank == 0 else "ring.yaml"
    try:
        train_rank(rank, os.path.join(TOPOLOGIES, name), 2, comm=comm)
        out["hash"] = "no error"
    except CommError as exc:
        out["hash"] = f"CommError: {exc}"
    # 3. one rank dies in the middle of a ring run.
    from lookahead_dist.decentralized import Decentralized

    prob = make_problem(world)
    model = copy.deepcopy(prob.module)
    opt = Decentralized(sgd(model.parameters()), model, os.path.join(TOPOLOGIES, "ring.yaml"), comm=comm)
    start = time.monotonic()
    try:
        for k in range(1000):
            if rank == kill_rank and k == kill_step:
                os._exit(17)
            opt.zero_grad()
            inputs, targets = prob.data_fn(rank, k)
            torch.nn.functional.mse_loss(model(inputs), targets).backward()
            opt.step()
        out["dead"] = "no error"
    except CommError as exc:
        out["dead"] = f"CommError: {exc}"
    out["dead_after_s"] = time.monotonic() - start
    comm.close()
    return out


def _slowmo_run(rank, world, cfg, comm, steps, prob, stop_at=None, state=None):
    """One SlowMo configuration on this rank; returns the per-step flat params (and a checkpoint if asked)."""
    from lookahead_dist.slowmo import SlowMo

    model = copy.deepcopy(prob.module)
    base = cfg.get("base")
    if base is not None and not isinstance(base, dict):
        base = os.path.join(TOPOLOGIES, base)
    lr = cfg.get("lr", LR)
    if cfg.get("ddp"):
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model)
    else:
        net = model
    inner = (
        sgd(model.parameters(), lr)
        if cfg.get("inner") is None
        else optimizer_from_spec(cfg["inner"], lr=lr)(model.parameters())
    )
    extra = {}
    if cfg.get("outer") is not None:
        extra = dict(outer=optimizer_from_spec(cfg["outer"]), scale_by_gamma=cfg.get("scale_by_gamma", False))
    extra.update({k: cfg[k] for k in ("fragments", "sync_dtype") if cfg.get(k) is not None})
    opt = SlowMo(
        inner,
        model,
        tau=cfg["tau"],
        alpha=cfg.get("alpha"),
        beta=cfg.get("beta"),
        base=base,
        optimizer_state=cfg.get("optimizer_state", "keep"),
        shard=cfg.get("shard", False),
        comm=comm,
        overlap=cfg.get("overlap", False),
        overlap_slow=cfg.get("overlap_slow", False),
        **extra,
    )
    sched = outer_sched = None
    if cfg.get("lr_decay"):
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: cfg["lr_decay"] ** k)
    if cfg.get("outer_decay"):  # an LR schedule on the outer optimizer, stepped after every inner step
        outer_sched = torch.optim.lr_scheduler.LambdaLR(opt.outer, lambda k: cfg["outer_decay"] ** k)
    if state is not None:
        opt.load_state_dict(state["opt"])
        if sched is not None:
            sched.load_state_dict(state["sched"])
        if outer_sched is not None:
            outer_sched.load_state_dict(state["outer_sched"])
    hist = [flat_model(model)]
    ckpt = None
    for k in range(opt.step_count, steps):
        if stop_at is not None and k == stop_at:
            import io

            blob = io.BytesIO()  # through torch.save / torch.load, as a checkpoint file would go
            torch.save(
                {
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict() if sched else None,
                    "outer_sched": outer_sched.state_dict() if outer_sched else None,
                },
                blob,
            )
            blob.seek(0)
            ckpt = torch.load(blob, map_location="cpu", weights_only=False)
        opt.zero_grad()
        inputs, targets = prob.data_fn(rank, k)
        torch.nn.functional.mse_loss(net(inputs), targets).backward()
        opt.step()
        if sched is not None:
            sched.step()
        if outer_sched is not None:
            outer_sched.step()
        hist.append(flat_model(model))
    out = {"hist": hist, "ckpt": ckpt, "bytes": opt.bytes_sent}
    opt.finalize()
    out["finalized"] = flat_model(model)
    return out


def optimizer_from_spec(spec, **overrides):
    """``(name, kwargs)`` -> a factory params -> torch.optim.<name>(params, **kwargs, **overrides) (picklable specs)."""
    name, kwargs = spec
    return lambda params: getattr(torch.optim, name)(params, **{**kwargs, **overrides})


def slowmo_configs(rank, world, configs, steps):
    """Run each SlowMo configuration in turn on one process group; resume checks included."""
    from lookahead_dist.comm import Comm

    comm = Comm()
    out = _slowmo_runs(rank, world, configs, comm, steps, make_problem(world))
    for name, cfg in configs.items():  # a resume check compares the last models
        if cfg.get("resume_at") is not None:
            out[name] = {k: out[name][k][-1] for k in ("full", "resumed")}
    comm.close()
    return out


def _slowmo_runs(rank, world, configs, comm, steps, prob):
    """Each configuration in turn; one with ``resume_at`` runs straight through (checkpointing at that step) and
    again from the checkpoint: {"full": its models, "resumed": the resumed run's, "finalized": full's finalize()}."""
    out = {}
    for name, cfg in configs.items():
        if cfg.get("resume_at") is None:
            out[name] = _slowmo_run(rank, world, cfg, comm, steps, prob)
            continue
        full = _slowmo_run(rank, world, cfg, comm, steps, prob, stop_at=cfg["resume_at"])
        resumed = _slowmo_run(rank, world, cfg, comm, steps, prob, state=full["ckpt"])
        out[name] = {"full": full["hist"], "resumed": resumed["hist"], "finalized": full["finalized"]}
    return out


def slowmo_lr_mismatch(rank, world):
    from lookahead_dist.slowmo import SlowMo

    model = torch.nn.Linear(2, 1)
    SlowMo(torch.optim.SGD(model.parameters(), lr=0.1 * (rank + 1)), model)


def batchnorm_buffers(rank, world):
    """Model buffers (BatchNorm running statistics) are mixed with the parameters, or kept local by option."""
    from lookahead_dist.comm import Comm
    from lookahead_dist.decentralized import Decentralized

    comm = Comm()
    out = {}
    for mix in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        with torch.no_grad():
            model[1].running_mean.fill_(float(rank))
            model[1].running_var.fill_(1.0 + rank)
        opt = Decentralized(
            torch.optim.SGD(model.parameters(), lr=0.0),
            model,
            os.path.join(TOPOLOGIES, "complete.yaml"),
            comm=comm,
            mix_buffers=mix,
        )
        model.eval()
        model(torch.ones(2, 3)).sum().backward()
        opt.step()
        out[mix] = (model[1].running_mean.clone(), model[1].running_var.clone(), int(model[1].num_batches_tracked))
    comm.close()
    return out


def exact_averages(rank, world):
    """exact_average_ on this rank's values with a push-sum-like weight (0 on the last rank), three ways.

    Returns the average computed as the trainer's evaluation model always has (one float64 buffer: the
    numerators w x with w appended, one all-reduce, then total[:-1] / total[-1]), and through
    exact_average_ with the weight in a slot, with a separate weight all-reduce, and from float32 buffers.
    """
    from lookahead_dist.comm import Comm
    from lookahead_dist.engine import exact_average_

    comm = Comm(heartbeat=0)
    g = torch.Generator().manual_seed(100 + rank)
    mine = torch.randn(1001, generator=g, dtype=torch.float64) * (rank + 1)
    weight = 0.0 if rank == world - 1 else 0.3 + 0.17 * rank
    total = torch.cat([mine * weight, torch.tensor([weight], dtype=torch.float64)])
    comm.all_reduce_sum(total, list(range(world)))
    classic = total[:-1] / total[-1]
    slot = torch.cat([mine, mine.new_tensor([weight])])
    wsum_slot = exact_average_([slot], weight, comm, weight_slot=True)
    split = [mine[:600].clone(), mine[600:].clone()]
    wsum_split = exact_average_(split, weight, comm)
    f32 = [mine.float()]
    exact_average_(f32, weight, comm)
    comm.close()
    return {
        "classic": classic,
        "slot": slot[:-1].clone(),
        "slot_weight": float(slot[-1]),
        "split": torch.cat(split),
        "wsum": (wsum_slot, wsum_split, float(total[-1])),
        "f32": f32[0],
        "mine": mine,
        "weight": weight,
    }


def overlap_suite(rank, world, names, steps, slowmo_configs_, slowmo_steps):
    """Everything overlapped that runs on 4 ranks, on one process group.

    For each named topology: an overlapped run (lr LR), and from perturbed starts with lr 0 an overlapped
    and a blocking run. Then SlowMo configurations (resume checks included), BatchNorm statistics under
    overlap, and an in-place change of the parameters while their exchange is in flight.
    """
    from lookahead_dist.comm import Comm
    from lookahead_dist.decentralized import Decentralized
    from lookahead_dist.errors import InFlightError

    comm = Comm()
    out = {"train": {}, "still": {}, "still_blocking": {}}
    for name in names:
        path = os.path.join(TOPOLOGIES, name)
        out["train"][name] = train_rank(rank, path, steps, comm=comm, record=True, overlap=True)
        out["still"][name] = train_rank(
            rank, path, 3 * steps, lr=0.0, comm=comm, record=True, perturb=1.0, overlap=True
        )
        out["still_blocking"][name] = train_rank(rank, path, 3 * steps, lr=0.0, comm=comm, record=True, perturb=1.0)
    prob = make_problem(world)
    out["slowmo"] = _slowmo_runs(rank, world, slowmo_configs_, comm, slowmo_steps, prob)

    # BatchNorm running statistics: forward's updates survive the overlapped combine, and are mixed.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    with torch.no_grad():
        model[1].running_mean.fill_(float(rank))
    opt = Decentralized(
        torch.optim.SGD(model.parameters(), lr=0.0),
        model,
        os.path.join(TOPOLOGIES, "complete.yaml"),
        comm=comm,
        overlap=True,
    )
    means = [model[1].running_mean.clone()]
    for k in range(3):
        x = torch.full((8, 3), float(k + 1)) + torch.arange(8.0)[:, None]
        model(x).sum().backward()
        opt.step()
        means.append(model[1].running_mean.clone())
    opt.finalize()
    out["bn"] = means

    # An in-place change of the parameters while their exchange is in flight.
    model = copy.deepcopy(prob.module)
    opt = Decentralized(sgd(model.parameters()), model, os.path.join(TOPOLOGIES, "ring.yaml"), comm=comm, overlap=True)
    opt.step()
    with torch.no_grad():
        next(model.parameters()).mul_(2.0)
    try:
        opt.step()
        out["inplace"] = "no error"
    except InFlightError as exc:
        out["inplace"] = f"InFlightError: {exc}"
    # the wrapper goes on after finalize(): the next step starts its exchange anew
    opt.finalize()
    opt.step()
    out["after_finalize_step"] = opt.step_count
    # dropped with its next exchange in flight (no finalize): a new wrapper on the same group still works
    del opt
    model = copy.deepcopy(prob.module)
    opt = Decentralized(sgd(model.parameters()), model, os.path.join(TOPOLOGIES, "ring.yaml"), comm=comm, overlap=True)
    for _ in range(2):
        opt.step()
    out["after_drop_step"] = opt.step_count
    comm.close()
    return out


def _compress_inputs(rank, n, seed, scale=120.0, big=True):
    """Values up to about ``scale`` (and beyond, for a few) with block-dependent magnitudes and (``big``) one
    shared-sign stretch of 100+ that an int8 sum would overflow on."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    x = torch.randn(n, generator=g, dtype=torch.float64) * scale / 3
    x *= torch.linspace(0.01, 1.0, n, dtype=torch.float64) ** 2  # blocks of very different magnitudes
    if big:
        x[: min(n, 50)] = 100.0 + rank  # 100+ on every rank: 4 x 100 in int8 would wrap
    return x


def compressed_syncs(rank, world):
    """compressed_average_ / CompressedSync on one group: float32 against exact_average_, one int8 and one
    bfloat16 round of odd lengths with push-sum-like weights, error feedback over many rounds, a resume, a
    subgroup of ranks, and a non-finite value. Tensors come back for the test to compare with float64."""
    from lookahead_dist.comm import Comm
    from lookahead_dist.compress import CompressedSync, Residuals, compressed_average_
    from lookahead_dist.engine import exact_average_
    from lookahead_dist.errors import DivergenceError

    comm = Comm(heartbeat=0)
    comm.group([1, 2, 3])  # every rank creates the subgroup, in the same order
    out = {}
    weights = [1.0, 0.5, 2.0, 0.0]  # push-sum-like, a passive rank included
    weight = weights[rank]

    # float32 (and None): bitwise exact_average_, for float32 and float64 buffers
    xs = [_compress_inputs(rank, n, 1).float() for n in (1, 4099, 10001)] + [_compress_inputs(rank, 77, 2)]
    exact = [x.clone() for x in xs]
    exact_average_(exact, weight, comm)
    out["f32"] = {"exact": exact}
    for dt in (None, "float32"):
        bufs = [x.clone() for x in xs]
        res = compressed_average_(bufs, weight, comm, sync_dtype=dt)
        out["f32"][dt] = (bufs, res.bytes_sent, res.weight_sum)

    # one round of int8 and bfloat16, no residual: lengths that are not multiples of W or of the block
    sizes = (1, 3, 4097, 3 * 4096 * 4 + 5, 10001)
    out["one_round"] = {"weights": weights, "sizes": sizes, "inputs": [_compress_inputs(rank, n, 3) for n in sizes]}
    for dt in ("int8", "bfloat16"):
        bufs = [x.float() if i % 2 else x.clone() for i, x in enumerate(out["one_round"]["inputs"])]
        res = compressed_average_(bufs, weight, comm, sync_dtype=dt)
        given = [x.clone() for x in bufs]
        res_given = compressed_average_(given, weight, comm, sync_dtype=dt, weight_sum=res.weight_sum)
        out["one_round"][dt] = (bufs, res.bytes_sent, res.weight_sum, res_given.bytes_sent)

    # error feedback: running sums of the applied averages against the exact ones, with and without residuals
    rounds, n = 40, 5001
    out["ef"] = {}
    for dt in ("int8", "bfloat16"):
        for inputs in ("fixed", "random"):
            for feedback in (True, False):
                sync = CompressedSync(dt, error_feedback=feedback)
                applied, true, top, errs = *torch.zeros(3, n, dtype=torch.float64), []
                for t in range(rounds):
                    x = _compress_inputs(rank, n, 10 + (t if inputs == "random" else 0), scale=3.0, big=False)
                    torch.maximum(top, x.abs(), out=top)
                    ref = [x.clone()]
                    exact_average_(ref, 1.0, comm)
                    buf = [x.float()]
                    sync.average_(buf, 1.0, comm, weight_sum=world)
                    applied += buf[0].double()
                    true += ref[0]
                    errs.append(float((applied - true).abs().max()))
                out["ef"][(dt, inputs, feedback)] = {"errs": errs, "top": top, "applied": applied, "true": true}

    # a resume mid-way: the residuals in state_dict make the rest bitwise
    def rounds_of(sync, ts):
        bufs = [[_compress_inputs(rank, 3001, 50 + t, scale=2.0).float()] for t in ts]
        for buf in bufs:
            sync.average_(buf, weight, comm)
        return [buf[0] for buf in bufs]

    full = CompressedSync("int8")
    rounds_of(full, range(3))
    state = full.state_dict()
    rest = rounds_of(full, range(3, 6))
    resumed = CompressedSync("int8")
    resumed.load_state_dict(state)
    out["resume"] = {
        "rest": rest,
        "resumed": rounds_of(resumed, range(3, 6)),
        "totals": (full.total_bytes_sent, resumed.total_bytes_sent, full.bytes_sent),
        "fresh": rounds_of(CompressedSync("int8"), range(3, 6)),
    }

    # a subgroup: rank 0 takes no part
    if rank != 0:
        x = _compress_inputs(rank, 9000, 60)
        buf = [x.clone()]
        res = compressed_average_(buf, 1.0, comm, sync_dtype="int8", ranks=[3, 1, 2], residual=Residuals())
        out["subset"] = {"x": x, "avg": buf[0], "bytes": res.bytes_sent}

    # a non-finite value on one rank: every rank raises, and the group goes on
    x = torch.ones(5000)
    x[4321] = float("nan") if rank == 2 else 1.0
    try:
        compressed_average_([x], 1.0, comm, sync_dtype="int8")
        out["nan"] = "no error"
    except DivergenceError as exc:
        out["nan"] = f"DivergenceError: {exc}"
    after = [torch.full((10,), float(rank))]
    compressed_average_(after, 1.0, comm, sync_dtype="int8")
    out["after_nan"] = after[0]
    comm.close()
    return out


def outer_suite(rank, world, configs, steps):
    """SlowMo configurations with outer optimizers and fragments (resume checks included) on one group,
    then BatchNorm statistics under an outer optimizer: averaged at the slow step, not stepped."""
    from lookahead_dist.comm import Comm
    from lookahead_dist.slowmo import SlowMo

    comm = Comm()
    out = _slowmo_runs(rank, world, configs, comm, steps, make_problem(world))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).double()
    opt = SlowMo(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model,
        tau=2,
        comm=comm,
        outer=lambda ps: torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True),
    )
    bn = []
    for k in range(4):
        x = torch.arange(24.0, dtype=torch.float64).reshape(8, 3) * (rank + 1) + k
        model(x).square().mean().backward()
        before = (model[1].running_mean.clone(), model[1].running_var.clone())
        opt.step()
        opt.zero_grad()
        bn.append((before, (model[1].running_mean.clone(), model[1].running_var.clone())))
    out["bn"] = bn
    comm.close()
    return out
