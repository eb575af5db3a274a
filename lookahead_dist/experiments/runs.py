"""The paper's experiments, rerun on a CPU: one command per figure.

::

    python -m lookahead_dist.experiments fig1     --out results/   # Figure 1: SGD+momentum vs Lookahead, alpha grid
    python -m lookahead_dist.experiments theorem2 --out results/   # bound (14) against mean ||grad f(y_k)||^2
    python -m lookahead_dist.experiments slowmo   --out results/   # SlowMo: beta grid over local SGD and SGP, 4 ranks
    python -m lookahead_dist.experiments report   --out results/ --docs docs/   # docs/RESULTS.md from the outputs
    python -m lookahead_dist.experiments all      --out results/ --docs docs/   # the three, then the report

Each experiment writes ``NAME.png``, ``NAME.csv``, ``NAME.md`` (the table and
the findings) and ``NAME.json`` (every number, the command and the wall time)
into ``--out``. Every option of a configuration below is a command-line flag
(``--steps 10 --seeds 2``; tuples as ``--alphas 0.2,0.5``); a small run goes
through exactly the code of the full one.

* ``fig1`` (paper Figure 1, on the 8x8 digits and the digits CNN without
  BatchNorm, so that the loss is a function of the parameters alone): SGD
  with momentum against Lookahead(tau, alpha) around the same SGD, each seed
  fixing the initial model and the minibatch stream. The full training loss
  is measured every ``eval_every`` steps (a multiple of tau, so the fast
  weights equal the slow weights there: x_k = z_k = y_k, the model Lookahead
  returns). Every run is done twice: serially with :class:`Lookahead` (SGD
  alone for the baseline) and as two processes with :class:`Decentralized`
  on the two-agent topology (rank 0 the fast agent, rank 1 the passive slow
  agent; alpha = 1 for the baseline), and the two loss curves must agree to
  ``tol`` relative. float64, because in float32 the one-ulp difference
  between z + alpha (x - z) and alpha x + (1 - alpha) z grows over a
  training run to well above 1e-6.
* ``theorem2``: :func:`~lookahead_dist.reference.theory.empirical_gradient_norm` on the
  rippled quadratic against :func:`~lookahead_dist.reference.theory.bound` (14), on a
  grid of alpha, tau and gamma, and :func:`~lookahead_dist.reference.theory.recommended_alpha`
  against the alpha with the lowest measured value (the same noise for every
  alpha of a cell).
* ``slowmo``: :class:`SlowMo` with alpha = 1 over local SGD and over SGP
  (push-sum on the one-peer exponential graph), beta on a grid, each worker on
  its own shard; one spawned gloo group runs every configuration in turn.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lookahead_dist.train.data import epoch_order, load_digits_split, shard_indices
from lookahead_dist.decentralized import Decentralized, run_passive
from lookahead_dist.errors import ConfigError, LookaheadDistError
from lookahead_dist.lookahead import Lookahead
from lookahead_dist.train.models import DigitsCNN
from lookahead_dist.slowmo import SlowMo

__all__ = ["EXPERIMENTS", "ExperimentError", "Fig1Config", "Progress", "SlowMoConfig", "Theorem2Config",
           "main", "run_fig1", "run_slowmo", "run_theorem2"]

#: The digits train/test split is fixed (seed 0) for every run; a run's seed fixes its model and batches.
SPLIT_SEED, TEST_FRACTION = 0, 0.2
PROG = "python -m lookahead_dist.experiments"


class ExperimentError(LookaheadDistError, AssertionError):
    """An experiment's built-in check failed (its outputs are written before this is raised)."""


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


@dataclass
class Theorem2Config:
    K: int = 10000
    seeds: int = 40
    taus: tuple = (1, 5, 10, 20)
    gammas: tuple = (0.01, 0.03)
    alpha_step: float = 0.025  # the fine alpha grid: alpha_step, 2 alpha_step, ..., 1
    sigma2: float = 20.0
    table_alphas: tuple = (0.1, 0.2, 0.3, 0.5, 0.7, 0.85, 1.0)  # rows of the markdown table


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


EXPERIMENTS = {"fig1": Fig1Config, "theorem2": Theorem2Config, "slowmo": SlowMoConfig}


# -- shared pieces ------------------------------------------------------------------------------


class Progress:
    """A progress bar over ``total`` steps: tqdm when it is installed, else a line per tenth."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done, self._shown = max(int(total), 1), desc, 0, -1
        self._t0 = time.perf_counter()
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
            print(f"[{desc}] 0/{self.total} steps", flush=True)
        else:
            self._bar = tqdm(total=self.total, desc=desc, unit="step", dynamic_ncols=True, mininterval=0.5)

    def set(self, done: int) -> None:
        done = min(int(done), self.total)
        if done <= self.done:
            return
        if self._bar is not None:
            self._bar.update(done - self.done)
        elif done * 10 // self.total > self._shown:
            self._shown = done * 10 // self.total
            print(f"[{self.desc}] {done}/{self.total} steps, {time.perf_counter() - self._t0:.0f} s", flush=True)
        self.done = done

    def close(self) -> None:
        self.set(self.total)
        if self._bar is not None:
            self._bar.close()


def _write_progress(path: str | None, done: int) -> None:
    """A spawned rank reports its progress to the parent through a file (written whole, then renamed)."""
    if path:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(str(done))
        os.replace(tmp, path)


class _SpawnJob:
    """``spawn(fn, world, *args, progress_path)`` in a background thread; ``done()`` reads rank 0's progress."""

    def __init__(self, fn, world: int, *args, timeout: float):
        from lookahead_dist.testing.spawn import spawn

        fd, self.path = tempfile.mkstemp(prefix="lookahead_dist-progress-")
        os.close(fd)
        self.result, self.error, self.wall_s = None, None, None

        def target():
            t0 = time.perf_counter()
            try:
                self.result = spawn(fn, world, *args, self.path, timeout=timeout, op_timeout=120.0)
            except BaseException as exc:  # noqa: BLE001 - re-raised in wait()
                self.error = exc
            self.wall_s = time.perf_counter() - t0

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def done(self) -> int:
        try:
            with open(self.path) as f:
                return int(f.read() or 0)
        except (OSError, ValueError):
            return 0

    def wait(self, on_poll=lambda done: None):
        while self.thread.is_alive():
            self.thread.join(0.5)
            on_poll(self.done())
        os.unlink(self.path)
        if self.error is not None:
            raise self.error
        return self.result


def _digits(dtype: torch.dtype):
    """(x_train, y_train, x_test, y_test) of the fixed digits split, images in ``dtype``."""
    xtr, ytr, xte, yte = load_digits_split(TEST_FRACTION, SPLIT_SEED)
    return xtr.to(dtype), ytr, xte.to(dtype), yte


def _index_stream(n: int, seed: int, batch_size: int, rank: int = 0, world: int = 1):
    """Batch indices of steps 0, 1, ...: rank's shard of range(n), reshuffled every epoch from (seed, rank, epoch).

    The stream of :func:`lookahead_dist.train.data.build_data` for digits: drop-last epochs of the shard.
    """
    shard = shard_indices(n, rank, world, seed)
    per_epoch = len(shard) // batch_size
    if per_epoch < 1:
        raise ConfigError(f"batch_size: {batch_size} is larger than a shard of {len(shard)} examples")
    epoch = 0
    while True:
        order = torch.from_numpy(epoch_order(shard, seed, rank, epoch))
        for i in range(per_epoch):
            yield order[i * batch_size:(i + 1) * batch_size]
        epoch += 1


def _lr(cfg, k: int) -> float:
    """Step-wise decay: lr * decay^(number of milestones passed), milestones as fractions of the run."""
    return cfg.lr * cfg.decay ** sum(k >= round(m * cfg.steps) for m in cfg.milestones)


def _model(seed: int, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(seed)
    return DigitsCNN(10, batch_norm=False).to(dtype)


def _train_step(cfg, k: int, model, sgd, opt, xtr, ytr, stream) -> None:
    """One optimizer step k: the scheduled learning rate on the inner SGD, the next minibatch, step ``opt``."""
    for group in sgd.param_groups:
        group["lr"] = _lr(cfg, k)
    idx = next(stream)
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
    opt.step()


@torch.no_grad()
def _loss(model, x, y) -> float:
    return float(F.cross_entropy(model(x), y))


@torch.no_grad()
def _accuracy(model, x, y) -> float:
    return float((model(x).argmax(1) == y).double().mean())


def machine() -> dict:
    """Where a result was produced."""
    load = os.getloadavg()[1] if hasattr(os, "getloadavg") else None  # 5-minute load average at the end
    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "load_avg_5min": load}


def _dtype(name: str) -> torch.dtype:
    if name not in ("float32", "float64"):
        raise ConfigError(f"dtype must be float32 or float64, got {name!r}")
    return getattr(torch, name)


def command(name: str, cfg, out: str) -> str:
    """The command line that reruns ``name`` with ``cfg`` (options left at their defaults are omitted)."""
    parts = [PROG, name, "--out", str(out)]
    for f in dataclasses.fields(cfg):
        value, default = getattr(cfg, f.name), f.default
        if value != default:
            text = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) \
                if isinstance(value, tuple) else (f"{value:g}" if isinstance(value, float) else str(value))
            parts += [f"--{f.name.replace('_', '-')}", text]
    return " ".join(parts)


def _finish(name: str, cfg, out: str, record: dict, t0: float) -> dict:
    """Add the common fields, write NAME.json, NAME.png, NAME.csv and NAME.md; return the record."""
    from lookahead_dist.experiments import report as rep

    record.update(experiment=name, config=dataclasses.asdict(cfg), command=command(name, cfg, out),
                  wall_time_s=time.perf_counter() - t0, machine=machine(),
                  finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{name}.json").write_text(json.dumps(record, indent=1))
    rep.write_outputs(name, record, path)
    return record


# -- Figure 1 -----------------------------------------------------------------------------------


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
    model = _model(seed, _dtype(cfg.dtype))
    sgd = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    if two_process:
        opt = Decentralized(sgd, model, two_agent_topology(alpha, cfg.tau))
        if opt.fast_agent is None:
            run_passive(opt, cfg.steps)
            return None
    else:
        opt = sgd if alpha == 1.0 else Lookahead(sgd, tau=cfg.tau, alpha=alpha)
    stream = _index_stream(len(xtr), seed, cfg.batch_size)
    curve = []
    for k in range(cfg.steps):
        if k % cfg.eval_every == 0:
            curve.append(_loss(model, xtr, ytr))
            if on_eval is not None:
                on_eval(k)
        _train_step(cfg, k, model, sgd, opt, xtr, ytr, stream)
    curve.append(_loss(model, xtr, ytr))
    return {"curve": curve, "test_accuracy": _accuracy(model, xte, yte)}


def _fig1_ranks(rank: int, world: int, cfg: Fig1Config, progress_path: str):
    """Every (variant, seed) of Figure 1 as two processes, in turn; rank 0 returns the results."""
    data = _digits(_dtype(cfg.dtype))
    out, done = {}, 0
    for label, alpha in _variants(cfg):
        for seed in range(cfg.seeds):
            report = (lambda k, d=done: _write_progress(progress_path, d + k)) if rank == 0 else None
            res = fig1_run(cfg, alpha, seed, data, two_process=True, on_eval=report)
            done += cfg.steps
            if rank == 0:
                out.setdefault(label, []).append(res)
                _write_progress(progress_path, done)
    return out if rank == 0 else None


def _check_fig1(cfg: Fig1Config) -> None:
    if cfg.steps < 1 or cfg.seeds < 1 or cfg.tau < 1:
        raise ConfigError(f"fig1: steps, seeds and tau must be >= 1, got {cfg.steps}, {cfg.seeds}, {cfg.tau}")
    if cfg.eval_every < 1 or cfg.eval_every % cfg.tau or cfg.steps % cfg.eval_every:
        raise ConfigError(f"fig1: eval_every must be a multiple of tau={cfg.tau} that divides steps={cfg.steps} "
                          f"(where fast and slow weights coincide), got {cfg.eval_every}")
    if not all(0.0 < a < 1.0 for a in cfg.alphas):
        raise ConfigError(f"fig1: alphas must lie in (0, 1), got {cfg.alphas}")


def run_fig1(cfg: Fig1Config, out: str = "results") -> dict:
    """Figure 1, serially and as two processes at once (the passive rank leaves a core to the serial runs)."""
    _check_fig1(cfg)
    t0 = time.perf_counter()
    variants = _variants(cfg)
    per_mode = len(variants) * cfg.seeds * cfg.steps
    bar = Progress(2 * per_mode, "fig1")
    job = _SpawnJob(_fig1_ranks, 2, cfg, timeout=3600.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on the spawned ranks: the same kernels, the same rounding
    try:
        data, serial, done = _digits(_dtype(cfg.dtype)), {}, 0
        t_serial = time.perf_counter()
        for label, alpha in variants:
            for seed in range(cfg.seeds):
                serial.setdefault(label, []).append(fig1_run(
                    cfg, alpha, seed, data, on_eval=lambda k, d=done: bar.set(d + k + job.done())))
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
        rows.append({"label": label, "alpha": alpha, "serial_curves": s.tolist(), "two_process_curves": d.tolist(),
                     "serial_test_accuracy": [r["test_accuracy"] for r in serial[label]],
                     "two_process_test_accuracy": [r["test_accuracy"] for r in dist[label]],
                     "max_rel_deviation": dev})
    record = {"steps_axis": list(range(0, cfg.steps + 1, cfg.eval_every)),
              "lr_milestones": [round(m * cfg.steps) for m in cfg.milestones], "variants": rows,
              "max_rel_deviation": worst, "serial_wall_s": t_serial, "two_process_wall_s": job.wall_s,
              "train_examples": len(data[0])}
    record = _finish("fig1", cfg, out, record, t0)
    if not worst <= cfg.tol:
        raise ExperimentError(f"fig1: the serial and the two-process loss curves differ by {worst:.3g} relative "
                              f"(allowed {cfg.tol:g}); outputs written to {out}")
    return record


# -- Theorem 2 ----------------------------------------------------------------------------------


def alpha_grid(step: float) -> list[float]:
    n = int(round(1.0 / step))
    if n < 1 or abs(n * step - 1.0) > 1e-9:
        raise ConfigError(f"theorem2: alpha_step must divide 1 (1/alpha_step an integer), got {step!r}")
    return [round(i / n, 12) for i in range(1, n + 1)]


def run_theorem2(cfg: Theorem2Config, out: str = "results") -> dict:
    """The measured mean of ||grad f(y_k)||^2 against bound (14); recommended against best alpha."""
    from lookahead_dist.reference import theory as th

    t0 = time.perf_counter()
    if any(cfg.K % tau for tau in cfg.taus) or cfg.seeds < 1:
        raise ConfigError(f"theorem2: K={cfg.K} must be a multiple of every tau {cfg.taus}, seeds >= 1")
    problem = th.RippledQuadratic()
    f_gap = float(problem.value(problem.default_start())) - problem.f_inf
    L, seeds, grid = problem.L, range(cfg.seeds), alpha_grid(cfg.alpha_step)
    cells = [(tau, gamma) for tau in cfg.taus for gamma in cfg.gammas]
    bar = Progress(len(cells) * (len(grid) + 1), "theorem2")

    def measure(alpha, tau, gamma):
        runs = th.empirical_gradient_norm(alpha, tau, gamma, cfg.K, seeds, sigma2=cfg.sigma2)
        se = float(runs.std(ddof=1) / np.sqrt(len(runs))) if len(runs) > 1 else float("nan")
        return float(runs.mean()), se

    rows, recs = [], []
    for tau, gamma in cells:
        cell = []
        for alpha in grid:
            emp, se = measure(alpha, tau, gamma)
            cond = th.step_size_condition(alpha, gamma, L, tau)
            b = th.bound(alpha, gamma, L, cfg.sigma2, tau, cfg.K, f_gap, strict=False)
            cell.append({"tau": tau, "gamma": gamma, "alpha": alpha, "cond13": cond, "holds13": cond <= 1.0,
                         "empirical": emp, "stderr": se, "bound14": b, "ratio": emp / b})
            bar.set(bar.done + 1)
        rows += cell
        best = min(cell, key=lambda r: r["empirical"])
        try:
            rec = th.recommended_alpha(gamma, L, cfg.sigma2, tau, cfg.K, f_gap)
        except ConfigError:
            rec = None
        emp_rec = measure(rec, tau, gamma) if rec is not None else (None, None)
        bar.set(bar.done + 1)
        feasible = [r for r in cell if r["holds13"]]
        recs.append({"tau": tau, "gamma": gamma, "recommended_alpha": rec, "empirical_at_recommended": emp_rec[0],
                     "stderr_at_recommended": emp_rec[1],
                     "bound_at_recommended": th.bound(rec, gamma, L, cfg.sigma2, tau, cfg.K, f_gap)
                     if rec is not None else None,
                     "best_alpha": best["alpha"], "empirical_at_best": best["empirical"],
                     "best_alpha_holds13": best["holds13"],
                     "best_alpha_feasible": min(feasible, key=lambda r: r["empirical"])["alpha"] if feasible else None,
                     "best_bound_alpha": min(feasible, key=lambda r: r["bound14"])["alpha"] if feasible else None})
    bar.close()
    record = {"problem": {"name": "RippledQuadratic", "d": problem.d, "a": problem.a, "b": problem.b,
                         "w": problem.w, "L": L, "min_curvature": problem.min_curvature, "f_gap": f_gap},
              "alphas": grid, "rows": rows, "recommended": recs}
    return _finish("theorem2", cfg, out, record, t0)


# -- SlowMo -------------------------------------------------------------------------------------

SLOWMO_BASES = {"local SGD": None, "SGP": {"generator": "one_peer_exponential", "push_sum": True}}


def _slowmo_ranks(rank: int, world: int, cfg: SlowMoConfig, progress_path: str):
    """Every (seed, base, beta) in turn on this group of ranks; rank 0 returns the results."""
    xtr, ytr, xte, yte = _digits(_dtype(cfg.dtype))
    results, done = [], 0
    for seed in range(cfg.seeds):
        for base_name, base in SLOWMO_BASES.items():
            for beta in cfg.betas:
                t0 = time.perf_counter()
                model = _model(seed, _dtype(cfg.dtype))  # the same initial model on every worker
                sgd = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
                opt = SlowMo(sgd, model, tau=cfg.tau, alpha=cfg.alpha, beta=float(beta), base=base)
                stream = _index_stream(len(xtr), seed, cfg.batch_size, rank, world)
                curve = [_loss(model, xtr, ytr)] if rank == 0 else None
                for k in range(cfg.steps):
                    _train_step(cfg, k, model, sgd, opt, xtr, ytr, stream)
                    if rank == 0 and (k + 1) % cfg.eval_every == 0 and k + 1 < cfg.steps:
                        curve.append(_loss(model, xtr, ytr))  # after a slow step: the consensus model z
                        _write_progress(progress_path, done + k + 1)
                opt.finalize()
                done += cfg.steps
                if rank == 0:
                    curve.append(_loss(model, xtr, ytr))
                    results.append({"seed": seed, "base": base_name, "beta": float(beta), "curve": curve,
                                    "final_train_loss": curve[-1], "test_accuracy": _accuracy(model, xte, yte),
                                    "wall_s": time.perf_counter() - t0})
                    _write_progress(progress_path, done)
    return results if rank == 0 else None


def run_slowmo(cfg: SlowMoConfig, out: str = "results") -> dict:
    """SlowMo against beta, over local SGD and SGP, on ``workers`` spawned gloo ranks."""
    if cfg.steps % cfg.tau or cfg.eval_every % cfg.tau or cfg.steps % cfg.eval_every:
        raise ConfigError(f"slowmo: steps={cfg.steps} and eval_every={cfg.eval_every} must be multiples of "
                          f"tau={cfg.tau}, and eval_every must divide steps")
    if cfg.workers < 2 or cfg.seeds < 1:
        raise ConfigError(f"slowmo: workers must be >= 2 and seeds >= 1, got {cfg.workers}, {cfg.seeds}")
    t0 = time.perf_counter()
    total = cfg.seeds * len(SLOWMO_BASES) * len(cfg.betas) * cfg.steps
    bar = Progress(total, "slowmo")
    job = _SpawnJob(_slowmo_ranks, cfg.workers, cfg, timeout=3600.0)
    try:
        results = job.wait(bar.set)[0]
    finally:
        bar.close()
    record = {"steps_axis": list(range(0, cfg.steps + 1, cfg.eval_every)), "bases": list(SLOWMO_BASES),
              "slow_steps": cfg.steps // cfg.tau, "runs": results, "train_examples": len(_digits(torch.float32)[0])}
    return _finish("slowmo", cfg, out, record, t0)


# -- command line -------------------------------------------------------------------------------


def _add_options(parser: argparse.ArgumentParser, cls) -> None:
    for f in dataclasses.fields(cls):
        default = f.default
        if isinstance(default, tuple):
            kind = float if any(isinstance(v, float) for v in default) else int
            conv = (lambda text, kind=kind: tuple(kind(v) for v in text.split(",") if v.strip()))
            shown = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
        else:
            conv, shown = type(default), default
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=conv, default=default,
                            help=f"(default {shown})")


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per experiment (its configuration's fields as flags), report, all."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="name", required=True)
    for name, cls in EXPERIMENTS.items():
        p = sub.add_parser(name, help=f"run {name}")
        p.add_argument("--out", default="results", help="output directory (default results)")
        _add_options(p, cls)
    for name in ("report", "all"):
        p = sub.add_parser(name, help="write DOCS/RESULTS.md from the outputs" if name == "report"
                           else "run fig1, theorem2 and slowmo with their defaults, then report")
        p.add_argument("--out", default="results", help="directory of the experiment outputs (default results)")
        p.add_argument("--docs", default="docs", help="where RESULTS.md and img/ go (default docs)")
    return parser


def config_from_args(args: argparse.Namespace):
    """The configuration of the experiment named in parsed ``args``."""
    cls = EXPERIMENTS[args.name]
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    runners = {"fig1": run_fig1, "theorem2": run_theorem2, "slowmo": run_slowmo}
    if args.name in EXPERIMENTS:
        cfg = config_from_args(args)
        record = runners[args.name](cfg, args.out)
        print(f"{args.name}: {record['wall_time_s']:.0f} s, outputs in {args.out}/{args.name}.{{png,csv,md,json}}")
        return 0
    if args.name == "all":
        for name, cls in EXPERIMENTS.items():
            record = runners[name](cls(), args.out)
            print(f"{name}: {record['wall_time_s']:.0f} s")
    from lookahead_dist.experiments import report as rep

    path = rep.write_results_md(args.out, args.docs)
    print(f"wrote {path}")
    return 0
