"""Slow momentum: :class:`SlowMo` with alpha = 1 over local SGD and over SGP, beta on a grid.

SGP is push-sum on the one-peer exponential graph; each worker trains on its
own shard; one spawned gloo group runs every configuration in turn.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lookahead_dist.errors import ConfigError
from lookahead_dist.experiments.common import (
    Progress,
    SpawnJob,
    accuracy,
    batch_stream,
    digits,
    finish,
    loss,
    make_model,
    torch_dtype,
    train_step,
    write_progress,
)
from lookahead_dist.slowmo import SlowMo

__all__ = ["SLOWMO_BASES", "SlowMoConfig", "run_slowmo"]


@dataclass
class SlowMoConfig:
    workers: int = 4
    steps: int = 480
    seeds: int = 5
    betas: tuple = (0.0, 0.3, 0.5, 0.7)
    tau: int = 12
    alpha: float = 1.0
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 32  # per worker
    eval_every: int = 48  # a multiple of tau: right after a slow step every worker holds the consensus z
    milestones: tuple = (0.5, 0.75)
    decay: float = 0.1
    dtype: str = "float32"


SLOWMO_BASES = {"local SGD": None, "SGP": {"generator": "one_peer_exponential", "push_sum": True}}


def _slowmo_ranks(rank: int, world: int, cfg: SlowMoConfig, progress_path: str):
    """Every (seed, base, beta) in turn on this group of ranks; rank 0 returns the results."""
    xtr, ytr, xte, yte = digits(torch_dtype(cfg.dtype))
    results, done = [], 0
    for seed in range(cfg.seeds):
        for base_name, base in SLOWMO_BASES.items():
            for beta in cfg.betas:
                t0 = time.perf_counter()
                model = make_model(seed, torch_dtype(cfg.dtype))  # the same initial model on every worker
                sgd = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
                opt = SlowMo(sgd, model, tau=cfg.tau, alpha=cfg.alpha, beta=float(beta), base=base)
                stream = batch_stream(xtr, ytr, seed, cfg.batch_size, rank, world)
                curve = [loss(model, xtr, ytr)] if rank == 0 else None
                for k in range(cfg.steps):
                    train_step(cfg, k, model, sgd, opt, stream)
                    if rank == 0 and (k + 1) % cfg.eval_every == 0 and k + 1 < cfg.steps:
                        curve.append(loss(model, xtr, ytr))  # after a slow step: the consensus model z
                        write_progress(progress_path, done + k + 1)
                opt.finalize()
                done += cfg.steps
                if rank == 0:
                    curve.append(loss(model, xtr, ytr))
                    results.append(
                        {
                            "seed": seed,
                            "base": base_name,
                            "beta": float(beta),
                            "curve": curve,
                            "final_train_loss": curve[-1],
                            "test_accuracy": accuracy(model, xte, yte),
                            "wall_s": time.perf_counter() - t0,
                        }
                    )
                    write_progress(progress_path, done)
    return results if rank == 0 else None


def run_slowmo(cfg: SlowMoConfig, out: str = "results") -> dict:
    """SlowMo against beta, over local SGD and SGP, on ``workers`` spawned gloo ranks."""
    if cfg.steps % cfg.tau or cfg.eval_every % cfg.tau or cfg.steps % cfg.eval_every:
        raise ConfigError(
            f"slowmo: steps={cfg.steps} and eval_every={cfg.eval_every} must be multiples of "
            f"tau={cfg.tau}, and eval_every must divide steps"
        )
    if cfg.workers < 2 or cfg.seeds < 1:
        raise ConfigError(f"slowmo: workers must be >= 2 and seeds >= 1, got {cfg.workers}, {cfg.seeds}")
    t0 = time.perf_counter()
    total = cfg.seeds * len(SLOWMO_BASES) * len(cfg.betas) * cfg.steps
    bar = Progress(total, "slowmo")
    job = SpawnJob(_slowmo_ranks, cfg.workers, cfg, timeout=3600.0)
    try:
        results = job.wait(bar.set)[0]
    finally:
        bar.close()
    record = {
        "steps_axis": list(range(0, cfg.steps + 1, cfg.eval_every)),
        "bases": list(SLOWMO_BASES),
        "slow_steps": cfg.steps // cfg.tau,
        "runs": results,
        "train_examples": len(digits(torch.float32)[0]),
    }
    return finish("slowmo", cfg, out, record, t0)
