"""The training loop with ``elastic: {enabled: true}``: a lost worker's survivors regroup and finish the run.

Launched by ``python -m lookahead_dist.elastic`` (torchrun's flags), whose MASTER_ADDR/PORT is the
job's store: every worker is a member of :class:`~lookahead_dist.membership.Membership`, and the
optimizer wrapper is built by :class:`~lookahead_dist.regroup.Elastic` for each generation of
members (``elastic=True``: what it cannot run is refused by name). The loop::

    while el.step_count < steps: step el.step_count (data and lr indexed by (member, step))
    if not el.finalize(): continue    # a member was lost at the very end: go on from el.step_count

After a change the survivors restart from their copies of one agreed step, so the batches and the
learning rate are functions of (member, step) only. Each member keeps its own training shard (of
the launch's world size) for the whole run: a dead worker's shard is not given to the survivors.

What is kept off the collectives, so that a death can only surface inside ``el.step()`` or
``el.finalize()``: the logged loss is the logging member's own (rank 0 of the current generation),
a non-finite loss stops that member only (the others go on without it), checkpoints are one file
per member (``checkpoints/elastic_step_K/member_M.pt``: model, ``el.opt.state_dict()``, the view),
written without a barrier and not resumable as a world, and the test accuracy is taken at the end,
on the survivors' consensus model (every survivor holds it after ``finalize``), over the whole test
set by the generation's rank 0, which writes summary.json (survivors, lost members, events) and
model.pt.
"""

from __future__ import annotations

import math
import os
import signal
import time

import torch

from lookahead_dist import comm as comm_mod
from lookahead_dist.errors import DivergenceError
from lookahead_dist.membership import Membership
from lookahead_dist.regroup import Elastic
from lookahead_dist.train.config import Config, resolve_topology
from lookahead_dist.train.data import build_data, check_data_path
from lookahead_dist.train.models import build_model
from lookahead_dist.train.rundir import MetricsLog, atomic_write, run_dir, write_final
from lookahead_dist.train.schedules import lr_at
from lookahead_dist.train.step import set_lr, train_step

__all__ = ["make_opt_factory", "train_elastic"]


def make_opt_factory(cfg: Config, model, optimizer, device):
    """``(make_opt(comm, topology), topology spec)`` for :class:`Elastic`: the trainer's wrapper of
    ``cfg.algorithm`` (:func:`lookahead_dist.train.trainer._build_algorithm`), on the topology re-planned
    for the members."""
    from lookahead_dist.train.trainer import _build_algorithm

    a = cfg.algorithm
    spec = str(resolve_topology(a.topology, cfg.source)) if a.topology and a.name != "local_sgd" else None

    def make_opt(comm, topology):
        # survivors may stop at different steps of the schedule; the copy they restart from restores the lr
        set_lr(optimizer, cfg.optim.lr)
        return _build_algorithm(cfg, model, optimizer, comm, device, topology=topology, elastic=True)[0]

    return make_opt, spec


def _save(run, el: Elastic, model, done: int) -> None:
    """This member's checkpoint file of step ``done`` (no barrier: a dead member's file is simply missing)."""
    folder = run / "checkpoints" / f"elastic_step_{done:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "step": done,
        "member": el.member,
        "view": el.view.to_json(),
        "model": model.state_dict(),
        "optimizer": el.opt.state_dict(),
    }
    atomic_write(folder / f"member_{el.member}.pt", lambda p: torch.save(state, p))


@torch.no_grad()
def _accuracy(model, data) -> tuple[float, int]:
    model.eval()
    hits, count = 0, 0
    for x, y in data.test():
        hits += int((model(x).argmax(1) == y).sum())
        count += len(y)
    model.train()
    return hits / max(count, 1), count


def train_elastic(cfg: Config, device, t_start: float) -> dict:
    """Run the configured training as one elastic member; returns the summary (the generation's rank 0 writes it)."""
    if cfg.data.name != "digits":
        check_data_path(cfg)
    backend = cfg.backend if cfg.backend != "auto" else comm_mod.default_backend(device)
    e = cfg.elastic
    ms = Membership.from_env(
        heartbeat=e.heartbeat, dead_after=e.dead_after, timeout=e.timeout, op_timeout=cfg.timeout_s, backend=backend
    )
    try:
        return _run(cfg, ms, device, t_start)
    finally:
        ms.close()


def _run(cfg: Config, ms: Membership, device, t_start: float) -> dict:
    torch.manual_seed(cfg.seed)  # the same initial model on every member
    model = build_model(cfg.model, small_inputs=cfg.data.name == "cifar10").to(device)
    from lookahead_dist.train.trainer import _optimizer

    optimizer = _optimizer(cfg, model.parameters())
    make_opt, spec = make_opt_factory(cfg, model, optimizer, device)
    el = Elastic(make_opt, spec, membership=ms, history=cfg.elastic.history, sync_every=cfg.elastic.sync_every)
    run = run_dir(cfg, el.opt.comm)  # generation 0, before the first step
    me, initial = el.member, ms.initial
    # this member's training shard of the launch's world, and the whole test set
    data = build_data(cfg, 0, 1, device, shard=(me, initial))
    total = cfg.steps if cfg.steps is not None else max(1, round(cfg.epochs * data.steps_per_epoch))
    log = MetricsLog(run, cfg, el.rank, 0, False)
    if el.rank == 0:
        print(
            f"[train] {cfg.algorithm.name} on {initial} elastic member(s), {device.type}, {cfg.data.name}/"
            f"{cfg.model.name}: {total} steps of batch {cfg.batch_size} per worker; run directory {run}",
            flush=True,
        )
    incarnation = int(os.environ.get("LOOKAHEAD_ELASTIC_RESTART", "0") or 0)
    kill_here = cfg.debug.kill_step is not None and cfg.debug.kill_rank == me and incarnation == 0
    seen, next_k, batches = 0, None, None
    loss_sum, loss_n, t_win = 0.0, 0, time.perf_counter()
    model.train()
    while True:
        while el.step_count < total:
            k = el.step_count
            if k != next_k:  # the start, or a restart at the agreed step after a membership change
                batches, loss_sum, loss_n = data.batches(k), 0.0, 0
            if kill_here and k == cfg.debug.kill_step:
                os.kill(os.getpid(), signal.SIGKILL)  # testing aid: debug.kill_step / debug.kill_rank
            lr = lr_at(cfg, k, total, data.steps_per_epoch)
            loss_val = train_step(model, optimizer, el, next(batches), lr)
            if not math.isfinite(loss_val):
                raise DivergenceError(f"member {me}: step {k}: the loss is not finite ({loss_val}); it stops")
            next_k = k + 1
            if len(el.events) != seen:
                seen = _announce_changes(el, seen)
                next_k = None
                continue
            loss_sum, loss_n = loss_sum + loss_val, loss_n + 1
            done = el.step_count
            if done % cfg.log_every == 0 and el.rank == 0:
                now = time.perf_counter()
                rec = {
                    "step": done,
                    "loss": loss_sum / max(loss_n, 1),
                    "lr": lr,
                    "world_size": el.world_size,
                    "samples_per_s": loss_n * cfg.batch_size / max(now - t_win, 1e-9),
                    "wall_time_s": now - t_start,
                }
                log.rank = 0
                log.append(rec)
                print(
                    f"[train] step {done:6d}  loss {rec['loss']:.4f}  lr {lr:.4g}  members {el.world_size}", flush=True
                )
            if done % cfg.log_every == 0:
                loss_sum, loss_n, t_win = 0.0, 0, time.perf_counter()
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                _save(run, el, model, done)
        if el.finalize():
            break
        seen, next_k = _announce_changes(el, seen), None
    acc, tested = _accuracy(model, data)
    summary = {
        "final_test_accuracy": acc,
        "test_examples": tested,
        "steps": total,
        "world_size": initial,
        "survivors": list(el.view.members),
        "lost": sorted({m for ev in el.events for m in ev["lost"]} - set(el.view.members)),
        "generation": el.view.generation,
        "algorithm": cfg.algorithm.name,
        "elastic_events": el.events,
        "wall_time_s": time.perf_counter() - t_start,
        "bytes_sent_per_rank": [int(getattr(el.opt, "bytes_sent", 0))],
        "final_loss": log.records[-1]["loss"] if log.records else None,
        "run_dir": str(run),
    }
    if el.rank == 0:
        log.rank = 0
        write_final(run, summary, model, log.records)
        print(f"[train] survivors {summary['survivors']}, lost {summary['lost']}", flush=True)
    el.close()
    return summary


def _announce_changes(el: Elastic, seen: int) -> int:
    """One line per membership change (rank 0 of the new generation); returns how many events were seen."""
    for ev in el.events[seen:]:
        if el.rank == 0:
            what = f"lost {ev['lost']}" if ev["lost"] else f"joined {ev['joined']}"
            why = (ev["why"] or ev["reason"])[:80]
            print(
                f"[train] generation {ev['generation']}: {what} ({why}); {ev['world_size']} "
                f"members go on from step {ev['to_step']} (stalled {ev['stall_s']:.2f} s)",
                flush=True,
            )
    return len(el.events)
