"""The training loop behind ``launch/train.py``: one worker per rank, any algorithm of the library.

``train(cfg)`` builds the model, the base optimizer with its learning-rate
schedule and the algorithm wrapper, then runs ``steps`` optimizer steps:

=============  ==================================================================================
algorithm      what runs on every rank
=============  ==================================================================================
slowmo         :class:`~lookahead_dist.slowmo.SlowMo` over the topology as its base (null: local steps);
               with ``outer.name`` set, its slow step is that optimizer
diloco         SlowMo whose slow step is the ``outer:`` optimizer (default Nesterov SGD, lr 0.7,
               momentum 0.9) on the pseudo-gradient, over local steps of the ``optim:`` optimizer
decentralized  :class:`~lookahead_dist.decentralized.Decentralized` with the topology file
               (D-PSGD, push-sum, local SGD or Lookahead, as the file's schedule says)
local_sgd      SlowMo with alpha = 1, beta = 0 and no base communication: an exact average every tau
allreduce      DistributedDataParallel: gradients averaged every step
lookahead      one rank: serial :class:`~lookahead_dist.lookahead.Lookahead`; several ranks:
               DistributedDataParallel under SlowMo with beta = 0, i.e. Lookahead over all-reduce SGD
=============  ==================================================================================

What is evaluated is the consensus model: the exact average of the workers'
models (push-sum: sum of numerators / sum of weights), all-reduced into a
separate evaluation model so that training is not disturbed. A non-finite
loss on any rank is agreed on collectively at every step; every rank then
stops with a :class:`~lookahead_dist.errors.DivergenceError` naming the step
and the rank(s), before the optimizer step, and the last checkpoint stays as
it was.

The parts: :mod:`~lookahead_dist.train.schedules` (the learning rate),
:mod:`~lookahead_dist.train.step` (one step), :mod:`~lookahead_dist.train.consensus`
(the evaluated model), :mod:`~lookahead_dist.train.checkpoint` (atomic per-rank
checkpoints, the manifest, resume) and :mod:`~lookahead_dist.train.rundir` (the
run directory: config.yaml, metrics.jsonl, summary.json, model.pt, plot.png).
With ``elastic: {enabled: true}`` the loop is :mod:`~lookahead_dist.train.elastic_run`'s.
"""

from __future__ import annotations

import math
import os
import signal
import time

import torch

from lookahead_dist import comm as comm_mod
from lookahead_dist.comm import Comm
from lookahead_dist.decentralized import Decentralized
from lookahead_dist.errors import ConfigError, DivergenceError
from lookahead_dist.lookahead import Lookahead
from lookahead_dist.slowmo import SlowMo
from lookahead_dist.train import checkpoint
from lookahead_dist.train.config import Config, resolve_topology
from lookahead_dist.train.consensus import Consensus, push_sum_weight
from lookahead_dist.train.data import build_data, check_data_path
from lookahead_dist.train.models import build_model
from lookahead_dist.train.rundir import MetricsLog, restart_count, run_dir, write_final
from lookahead_dist.train.schedules import lr_at
from lookahead_dist.train.step import train_step

__all__ = ["init_distributed", "lr_at", "train"]


# -- set-up --------------------------------------------------------------------------------


def init_distributed(cfg: Config) -> torch.device:
    """Join torchrun's process group (or start a 1-rank gloo group without torchrun); return this rank's device."""
    torch.set_num_threads(1)
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but CUDA is not available")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if want_cuda else torch.device("cpu")
    backend = cfg.backend if cfg.backend != "auto" else comm_mod.default_backend(device)
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("backend: nccl needs device cuda")
    if not comm_mod.is_initialized() and not cfg.elastic.enabled:  # elastic: Membership forms the groups
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            comm_mod.init_process_group(backend, timeout_s=cfg.timeout_s)
        else:
            comm_mod.init_single_process_group(backend, timeout_s=cfg.timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(params, lr=o.lr, weight_decay=o.weight_decay)


def _outer_factory(cfg: Config):
    """``params -> torch.optim.Optimizer``: the slow step's optimizer of the ``outer:`` section (None: none runs)."""
    o = cfg.outer
    if cfg.algorithm.name not in ("slowmo", "diloco") or o.name is None:
        return None
    if o.name == "sgd":
        return lambda params: torch.optim.SGD(
            params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
        )
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return lambda params: cls(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def _build_algorithm(cfg: Config, model, optimizer, comm: Comm, device, topology=None, elastic: bool = False):
    """(step wrapper, module to call): the algorithm of ``cfg.algorithm`` around ``optimizer``.

    ``topology`` replaces the configured file (elastic membership passes the topology re-planned for the
    survivors) and ``elastic`` is passed to the wrapper, which refuses what elastic membership cannot run.
    """
    a, W = cfg.algorithm, comm.world_size
    given = topology

    def topology():
        return given if given is not None else str(resolve_topology(a.topology, cfg.source))

    def ddp(module):
        if W == 1:
            return module
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)

    common = dict(
        optimizer_state=a.optimizer_state,
        shard=a.shard,
        comm=comm,
        mix_buffers=a.mix_buffers,
        overlap_slow=a.overlap_slow,
        elastic=elastic,
    )
    slow = dict(fragments=a.fragments, sync_dtype=a.sync_dtype)  # the slow step's streaming and wire format
    if a.name in ("slowmo", "diloco"):
        base = topology() if a.topology else None
        outer = dict(outer=_outer_factory(cfg), scale_by_gamma=a.scale_by_gamma)
        return SlowMo(
            optimizer,
            model,
            tau=a.tau,
            alpha=a.alpha,
            beta=a.beta,
            base=base,
            overlap=a.overlap,
            **outer,
            **slow,
            **common,
        ), model
    if a.name == "decentralized":
        return Decentralized(
            optimizer, model, topology(), comm=comm, mix_buffers=a.mix_buffers, overlap=a.overlap, elastic=elastic
        ), model
    if a.name == "local_sgd":
        return SlowMo(optimizer, model, tau=a.tau, alpha=1.0, beta=0.0, base=None, **slow, **common), model
    if a.name == "allreduce":
        return optimizer, ddp(model)
    if W == 1:  # lookahead
        if a.overlap_slow:
            raise ConfigError(
                "algorithm.overlap_slow: true overlaps the slow step's all-reduce across ranks; serial lookahead on "
                "one rank has none (set it to false, or run on several ranks)"
            )
        return Lookahead(optimizer, tau=a.tau, alpha=a.alpha), model
    # lookahead on several ranks: Lookahead over all-reduce SGD (_announce says so at start)
    opt = SlowMo(optimizer, model, tau=a.tau, alpha=a.alpha, beta=0.0, base=None, **common)
    return opt, ddp(model)


# -- the loop ----------------------------------------------------------------------------------


def _diverged(comm: Comm, step: int, loss: float, run) -> DivergenceError:
    losses = comm.all_gather_object(loss)
    bad = [r for r, v in enumerate(losses) if not math.isfinite(v)]
    return DivergenceError(
        f"step {step}: the loss is not finite ({[losses[r] for r in bad]}) on rank(s) {bad}; "
        f"every rank stops ({checkpoint.last_checkpoint(run)})"
    )


def _announce(cfg: Config, comm: Comm) -> None:
    """Rank 0 says what the config does not spell out: deprecated spellings, and what lookahead becomes."""
    if comm.rank != 0:
        return
    for note in cfg.deprecations:
        print(f"[train] deprecated: {note}", flush=True)
    a = cfg.algorithm
    if _outer_factory(cfg) is not None:
        o = cfg.outer
        args = {k: v for k, v in vars(o).items() if k != "name" and v is not None}
        print(
            f"[train] algorithm {a.name}: every tau={a.tau} steps of {cfg.optim.name} "
            f"({'over ' + a.topology if a.topology else 'local, no communication between syncs'}), the outer "
            f"optimizer {o.name}({', '.join(f'{k}={v}' for k, v in args.items())}) steps the slow model on the "
            f"pseudo-gradient z - x_bar; fragments={a.fragments}, sync_dtype={a.sync_dtype or 'float32'}",
            flush=True,
        )
    if a.name == "lookahead" and comm.world_size > 1:
        print(
            f"[train] algorithm lookahead on {comm.world_size} ranks runs as SlowMo with beta 0 over "
            f"DistributedDataParallel: gradients all-reduced every step, and every tau={a.tau} steps the slow "
            f"model z <- z + alpha (x_bar - z), alpha={a.alpha:g}, x_bar the workers' average (Lookahead over "
            f"all-reduce SGD)",
            flush=True,
        )


def train(cfg: Config) -> dict:
    """Run the configured training on this rank; return the summary (the same dict on every rank)."""
    t_start = time.perf_counter()
    device = init_distributed(cfg)
    if cfg.elastic.enabled:  # a member of `python -m lookahead_dist.elastic`: survivors of a lost worker go on
        from lookahead_dist.train.elastic_run import train_elastic

        return train_elastic(cfg, device, t_start)
    comm = Comm()
    try:
        return _train(cfg, comm, device, t_start)
    finally:
        comm.close()


def _train(cfg: Config, comm: Comm, device, t_start: float) -> dict:
    rank, W = comm.rank, comm.world_size
    if cfg.data.name != "digits":
        check_data_path(cfg)  # before anything is built or written
    run = run_dir(cfg, comm)
    _announce(cfg, comm)
    torch.manual_seed(cfg.seed)  # the same initial model on every rank
    model = build_model(cfg.model, small_inputs=cfg.data.name == "cifar10").to(device)
    optimizer = _optimizer(cfg, model.parameters())
    opt, net = _build_algorithm(cfg, model, optimizer, comm, device)
    active = push_sum_weight(opt) > 0
    # DistributedDataParallel's gradient all-reduce, counted like the library's all-reduces (a ring: 2 (W-1)/W)
    ddp_bytes = (
        2 * (W - 1) * sum(p.numel() * p.element_size() for p in model.parameters()) // W
        if isinstance(net, torch.nn.parallel.DistributedDataParallel)
        else 0
    )
    workers = [r for r, a in enumerate(comm.all_gather_object(active)) if a]  # the ranks that take data
    data = build_data(cfg, rank, W, device, shard=(workers.index(rank), len(workers)) if active else (0, 1))
    total = cfg.steps if cfg.steps is not None else max(1, round(cfg.epochs * data.steps_per_epoch))
    consensus = Consensus(cfg, model, comm, device)
    # --resume, or a group that torchrun restarted after a failure: continue from the committed checkpoint
    restarted = restart_count() > 0 and (run / "checkpoints" / "manifest.json").exists()
    resume = cfg.resume or restarted
    if restarted and rank == 0:
        print(
            f"[train] restart {restart_count()} of this torchrun group: resuming from {run / 'checkpoints'}", flush=True
        )
    start, sent_before = checkpoint.resume(run, comm, model, opt) if resume else (0, 0)
    if start >= total:
        raise ConfigError(f"resume: the checkpoint is at step {start}, the run has only {total} steps")
    log = MetricsLog(run, cfg, rank, start, resume)
    if rank == 0:
        print(
            f"[train] {cfg.algorithm.name} on {W} rank(s), {device.type}, {cfg.data.name}/{cfg.model.name}: "
            f"{total} steps of batch {cfg.batch_size} per worker ({data.steps_per_epoch} steps per epoch of a "
            f"{data.shard_size}-example shard), from step {start}; run directory {run}",
            flush=True,
        )
    ranks = list(range(W))

    def sent_bytes(done: int) -> int:
        return sent_before + int(getattr(opt, "bytes_sent", 0)) + ddp_bytes * (done - start)

    def stop_if_diverged(k: int, loss_val: float) -> None:
        if comm.all_reduce_flag(not math.isfinite(loss_val)):
            err = _diverged(comm, k, loss_val, run)
            comm.barrier()
            raise err

    batches = data.batches(start) if active else None
    loss_sum, loss_n, t_win, acc = 0.0, 0, time.perf_counter(), None
    nan_here = cfg.debug.nan_step is not None and cfg.debug.nan_rank == rank
    kill_here = cfg.debug.kill_step is not None and cfg.debug.kill_rank == rank and restart_count() == 0
    net.train()
    for k in range(start, total):
        if kill_here and k == cfg.debug.kill_step:
            os.kill(os.getpid(), signal.SIGKILL)  # testing aid: debug.kill_step / debug.kill_rank
        lr = lr_at(cfg, k, total, data.steps_per_epoch)
        loss_val = train_step(
            net,
            optimizer,
            opt,
            next(batches) if active else None,
            lr,
            poison=nan_here and k == cfg.debug.nan_step,  # testing aid: debug.nan_step / nan_rank
            check=lambda loss, k=k: stop_if_diverged(k, loss),
        )
        loss_sum, loss_n = loss_sum + loss_val, loss_n + (1 if active else 0)
        done = k + 1
        eval_now = done == total or (cfg.eval_every > 0 and done % cfg.eval_every == 0)
        log_now = eval_now or done % cfg.log_every == 0
        if log_now:
            if done == total and hasattr(opt, "finalize"):
                opt.finalize()  # every worker <- the consensus model
            cdist = consensus.update(push_sum_weight(opt))
            acc = consensus.accuracy(data) if eval_now else acc
            window = torch.tensor([loss_sum, loss_n], dtype=torch.float64, device=comm.device_for_collectives())
            comm.all_reduce_sum(window, ranks)
            now = time.perf_counter()
            rec = {
                "step": done,
                "loss": float(window[0] / max(float(window[1]), 1.0)),
                "lr": lr,
                "consensus_distance": cdist,
                "bytes_sent": sent_bytes(done),
                "samples_per_s": float(window[1]) * cfg.batch_size / max(now - t_win, 1e-9),
                "wall_time_s": now - t_start,
            }
            if eval_now:
                rec["test_accuracy"] = acc
            log.append(rec)
            if rank == 0:
                print(
                    f"[train] step {done:6d}  loss {rec['loss']:.4f}  lr {lr:.4g}  consensus {cdist:.3g}  "
                    f"{rec['samples_per_s']:.0f} samples/s" + (f"  test acc {acc:.4f}" if eval_now else ""),
                    flush=True,
                )
            loss_sum, loss_n, t_win = 0.0, 0, time.perf_counter()
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            checkpoint.save(run, done, comm, model, opt, sent_bytes(done))
    wall = time.perf_counter() - t_start
    sent = comm.all_gather_object(sent_bytes(total))
    tested = int(sum(comm.all_gather_object(data.test_size)))
    records = log.records
    summary = {
        "final_test_accuracy": acc,
        "test_examples": tested,
        "steps": total,
        "world_size": W,
        "algorithm": cfg.algorithm.name,
        "wall_time_s": wall,
        "bytes_sent_per_rank": sent,
        "final_loss": records[-1]["loss"] if records else None,
        "run_dir": str(run),
    }
    if rank == 0:
        # the consensus model (every worker holds it after finalize), to evaluate and export
        write_final(run, summary, model, records)
    return summary
