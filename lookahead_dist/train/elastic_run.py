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
``el.finalize()``: the run directory is chosen once through the job's store (a rejoining member
reads it there), the logged loss is the logging member's own (rank 0 of the current generation),
a non-finite loss stops that member only (the others go on without it), checkpoints are one file
per member written without a barrier (:mod:`~lookahead_dist.train.elastic_checkpoint`; ``resume:
true`` loads the newest step that one generation completed, on as many workers as it had members,
each taking the state and data shard of the old member of its rank), and the test accuracy is
taken at the end, on the survivors' consensus model (every survivor holds it after ``finalize``),
over the whole test set by the generation's rank 0, which writes summary.json (survivors, lost
members, events) and model.pt. A restarted worker that rejoins never rewrites the run's config or
log.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import torch

from lookahead_dist import comm as comm_mod
from lookahead_dist.errors import ConfigError, DivergenceError
from lookahead_dist.membership import Membership
from lookahead_dist.regroup import Elastic
from lookahead_dist.train import elastic_checkpoint
from lookahead_dist.train.config import Config, resolve_topology
from lookahead_dist.train.data import build_data, check_data_path
from lookahead_dist.train.models import build_model
from lookahead_dist.train.rundir import MetricsLog, new_run_path, write_final
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


def _run_dir(cfg: Config, ms: Membership) -> Path:
    """The run directory, created: ``out_dir``, or runs/<name or timestamp>; the first member to ask decides it
    in the job's store (compare-and-set), so every member and every later rejoining one uses the same."""
    won = ms.store.compare_set("run_dir", "", str(Path(new_run_path(cfg)).resolve()))
    path = Path(won.decode() if isinstance(won, bytes) else won)
    path.mkdir(parents=True, exist_ok=True)
    return path


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
    run = _run_dir(cfg, ms)
    el = Elastic(make_opt, spec, membership=ms, history=cfg.elastic.history, sync_every=cfg.elastic.sync_every)
    me, initial = el.member, ms.initial
    joined = el.view.generation > 0  # a restarted worker, taken in by a running job
    # this member's training shard (its id among the launch's workers; on a resume, the old member's)
    start, shard = 0, (me, initial)
    if cfg.resume and not joined:
        start, shard = elastic_checkpoint.resume(run, el, model)
    data = build_data(cfg, 0, 1, device, shard=shard)
    total = cfg.steps if cfg.steps is not None else max(1, round(cfg.epochs * data.steps_per_epoch))
    if start >= total:
        raise ConfigError(f"resume: the checkpoint is at step {start}, the run has only {total} steps")
    log = MetricsLog(run, cfg, -1 if joined else el.rank, start, cfg.resume)
    if el.rank == 0 and not joined:
        print(
            f"[train] {cfg.algorithm.name} on {initial} elastic member(s), {device.type}, {cfg.data.name}/"
            f"{cfg.model.name}: {total} steps of batch {cfg.batch_size} per worker; run directory {run}"
            + (f"; resumed at step {start} (member {shard[0]}'s state and shard on member {me})" if start else ""),
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
            if cfg.debug.step_sleep:
                time.sleep(cfg.debug.step_sleep)  # testing aid: a restarted worker is back before the end
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
                elastic_checkpoint.save(run, el, model, done, shard)
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
                f"members go on from step {ev['to_step']}"
                + (f" over {ev['topology']}" if ev["topology"] else "")
                + f" (stalled {ev['stall_s']:.2f} s)",
                flush=True,
            )
    return len(el.events)
