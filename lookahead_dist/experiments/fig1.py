"""Figure 1 of the paper: SGD with momentum against Lookahead(tau, alpha), serially and as two processes.

On the 8x8 digits and the digits CNN without BatchNorm (so that the loss is a
function of the parameters alone); each seed fixes the initial model and the
minibatch stream. The full training loss is measured every ``eval_every``
steps (a multiple of tau, so the fast weights equal the slow weights there).
Every run is done twice: serially with :class:`Lookahead` (SGD alone for the
baseline) and as two processes with :class:`Decentralized` on the two-agent
topology (rank 0 the fast agent, rank 1 the passive slow agent), and the two
loss curves must agree to ``tol`` relative.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from lookahead_dist.decentralized import Decentralized, run_passive
from lookahead_dist.errors import ConfigError
from lookahead_dist.experiments.common import (
    ExperimentError,
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
from lookahead_dist.lookahead import Lookahead

__all__ = ["Fig1Config", "fig1_run", "run_fig1", "two_agent_topology"]


@dataclass
class Fig1Config:
    steps: int = 1500
    seeds: int = 5
    alphas: tuple = (0.2, 0.5, 0.8)
    tau: int = 5
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 32
    eval_every: int = 50  # a multiple of tau: the fast weights equal the slow weights there
    milestones: tuple = (0.5, 0.75)  # fractions of the run where lr *= decay
    decay: float = 0.1
    dtype: str = "float64"
    tol: float = 1e-6  # max relative deviation allowed between the serial and the two-process curves


def _variants(cfg: Fig1Config) -> list[tuple[str, float]]:
    """(label, alpha): SGD with momentum (alpha = 1: the inner optimizer alone), then Lookahead's alphas."""
    return [("SGD+momentum", 1.0)] + [(f"Lookahead alpha={a:g}", float(a)) for a in cfg.alphas]


def two_agent_topology(alpha: float, tau: int) -> dict:
    """topologies/two_agent.yaml with this alpha and tau: fast agent on rank 0, slow agent on rank 1."""
    return {"generator": {"type": "two_agent", "alpha": alpha, "tau": tau}, "roles": ["fast", "slow"]}


def fig1_run(cfg: Fig1Config, alpha: float, seed: int, data, *, two_process: bool = False, on_eval=None):
    """One run of Figure 1; returns {"curve": full training loss every eval_every steps, "test_accuracy"}.

    Serial: SGD (alpha = 1) or Lookahead(SGD, tau, alpha). Two-process: Decentralized(SGD) on the
    two-agent topology; on the passive rank (the slow agent) only the mixing steps run, and None is
    returned. ``on_eval(steps_done)`` is called at every evaluation.
    """
    xtr, ytr, xte, yte = data
    model = make_model(seed, torch_dtype(cfg.dtype))
    sgd = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    if two_process:
        opt = Decentralized(sgd, model, two_agent_topology(alpha, cfg.tau))
        if opt.fast_agent is None:
            run_passive(opt, cfg.steps)
            return None
    else:
        opt = sgd if alpha == 1.0 else Lookahead(sgd, tau=cfg.tau, alpha=alpha)
    stream = batch_stream(xtr, ytr, seed, cfg.batch_size)
    curve = []
    for k in range(cfg.steps):
        if k % cfg.eval_every == 0:
            curve.append(loss(model, xtr, ytr))
            if on_eval is not None:
                on_eval(k)
        train_step(cfg, k, model, sgd, opt, stream)
    curve.append(loss(model, xtr, ytr))
    return {"curve": curve, "test_accuracy": accuracy(model, xte, yte)}


def _fig1_ranks(rank: int, world: int, cfg: Fig1Config, progress_path: str):
    """Every (variant, seed) of Figure 1 as two processes, in turn; rank 0 returns the results."""
    data = digits(torch_dtype(cfg.dtype))
    out, done = {}, 0
    for label, alpha in _variants(cfg):
        for seed in range(cfg.seeds):
            report = (lambda k, d=done: write_progress(progress_path, d + k)) if rank == 0 else None
            res = fig1_run(cfg, alpha, seed, data, two_process=True, on_eval=report)
            done += cfg.steps
            if rank == 0:
                out.setdefault(label, []).append(res)
                write_progress(progress_path, done)
    return out if rank == 0 else None


def _check_fig1(cfg: Fig1Config) -> None:
    if cfg.steps < 1 or cfg.seeds < 1 or cfg.tau < 1:
        raise ConfigError(f"fig1: steps, seeds and tau must be >= 1, got {cfg.steps}, {cfg.seeds}, {cfg.tau}")
    if cfg.eval_every < 1 or cfg.eval_every % cfg.tau or cfg.steps % cfg.eval_every:
        raise ConfigError(
            f"fig1: eval_every must be a multiple of tau={cfg.tau} that divides steps={cfg.steps} "
            f"(where fast and slow weights coincide), got {cfg.eval_every}"
        )
    if not all(0.0 < a < 1.0 for a in cfg.alphas):
        raise ConfigError(f"fig1: alphas must lie in (0, 1), got {cfg.alphas}")


def run_fig1(cfg: Fig1Config, out: str = "results") -> dict:
    """Figure 1, serially and as two processes at once (the passive rank leaves a core to the serial runs)."""
    _check_fig1(cfg)
    t0 = time.perf_counter()
    variants = _variants(cfg)
    per_mode = len(variants) * cfg.seeds * cfg.steps
    bar = Progress(2 * per_mode, "fig1")
    job = SpawnJob(_fig1_ranks, 2, cfg, timeout=3600.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on the spawned ranks: the same kernels, the same rounding
    try:
        data, serial, done = digits(torch_dtype(cfg.dtype)), {}, 0
        t_serial = time.perf_counter()
        for label, alpha in variants:
            for seed in range(cfg.seeds):
                serial.setdefault(label, []).append(
                    fig1_run(cfg, alpha, seed, data, on_eval=lambda k, d=done: bar.set(d + k + job.done()))
                )
                done += cfg.steps
        t_serial = time.perf_counter() - t_serial
        dist = job.wait(lambda d: bar.set(done + d))[0]
    finally:
        torch.set_num_threads(threads)
        bar.close()
    rows, worst = [], 0.0
    for label, alpha in variants:
        s = np.array([r["curve"] for r in serial[label]])
        d = np.array([r["curve"] for r in dist[label]])
        dev = float(np.max(np.abs(d - s) / np.abs(s)))
        worst = max(worst, dev)
        rows.append(
            {
                "label": label,
                "alpha": alpha,
                "serial_curves": s.tolist(),
                "two_process_curves": d.tolist(),
                "serial_test_accuracy": [r["test_accuracy"] for r in serial[label]],
                "two_process_test_accuracy": [r["test_accuracy"] for r in dist[label]],
                "max_rel_deviation": dev,
            }
        )
    record = {
        "steps_axis": list(range(0, cfg.steps + 1, cfg.eval_every)),
        "lr_milestones": [round(m * cfg.steps) for m in cfg.milestones],
        "variants": rows,
        "max_rel_deviation": worst,
        "serial_wall_s": t_serial,
        "two_process_wall_s": job.wall_s,
        "train_examples": len(data[0]),
    }
    record = finish("fig1", cfg, out, record, t0)
    if not worst <= cfg.tol:
        raise ExperimentError(
            f"fig1: the serial and the two-process loss curves differ by {worst:.3g} relative "
            f"(allowed {cfg.tol:g}); outputs written to {out}"
        )
    return record
