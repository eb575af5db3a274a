"""What the three experiments share: the digits data, the batch stream, the schedule, the training step, the
progress bar, the spawned group and the output files.

The data, the batch stream, the learning-rate schedule and the training step
are the trainer's (:mod:`lookahead_dist.train`); the functions here only fix
the experiments' choices (a fixed split, milestones as fractions of a run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lookahead_dist.errors import ConfigError, LookaheadDistError
from lookahead_dist.train import step
from lookahead_dist.train.data import load_digits_split, shard_batches, shard_indices
from lookahead_dist.train.models import DigitsCNN
from lookahead_dist.train.schedules import step_decay

__all__ = [
    "PROG",
    "ExperimentError",
    "Progress",
    "SpawnJob",
    "accuracy",
    "batch_stream",
    "command",
    "digits",
    "finish",
    "loss",
    "machine",
    "make_model",
    "scheduled_lr",
    "torch_dtype",
    "train_step",
    "write_progress",
]

#: The digits train/test split is fixed (seed 0) for every run; a run's seed fixes its model and batches.
SPLIT_SEED, TEST_FRACTION = 0, 0.2
PROG = "python -m lookahead_dist.experiments"


class ExperimentError(LookaheadDistError, AssertionError):
    """An experiment's built-in check failed (its outputs are written before this is raised)."""


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


def write_progress(path: str | None, done: int) -> None:
    """A spawned rank reports its progress to the parent through a file (written whole, then renamed)."""
    if path:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(str(done))
        os.replace(tmp, path)


class SpawnJob:
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


def digits(dtype: torch.dtype):
    """(x_train, y_train, x_test, y_test) of the fixed digits split, images in ``dtype``."""
    xtr, ytr, xte, yte = load_digits_split(TEST_FRACTION, SPLIT_SEED)
    return xtr.to(dtype), ytr, xte.to(dtype), yte


def batch_stream(x: torch.Tensor, y: torch.Tensor, seed: int, batch_size: int, rank: int = 0, world: int = 1):
    """The batches of steps 0, 1, ...: rank's shard of the training set, reshuffled every epoch from (seed, rank,
    epoch); the digits stream of the trainer (:func:`lookahead_dist.train.data.shard_batches`)."""
    return shard_batches(x, y, shard_indices(len(x), rank, world, seed), seed, rank, batch_size)


def scheduled_lr(cfg, k: int) -> float:
    """Step-wise decay: lr * decay^(number of milestones passed), milestones as fractions of the run."""
    return step_decay(cfg.lr, k, [round(m * cfg.steps) for m in cfg.milestones], cfg.decay)


def make_model(seed: int, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(seed)
    return DigitsCNN(10, batch_norm=False).to(dtype)


def train_step(cfg, k: int, model, sgd, opt, stream) -> None:
    """One optimizer step k (the trainer's step): the scheduled learning rate on the inner SGD, the next
    minibatch, step ``opt``."""
    step.train_step(model, sgd, opt, next(stream), scheduled_lr(cfg, k))


@torch.no_grad()
def loss(model, x, y) -> float:
    return float(F.cross_entropy(model(x), y))


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return float((model(x).argmax(1) == y).double().mean())


def machine() -> dict:
    """Where a result was produced."""
    load = os.getloadavg()[1] if hasattr(os, "getloadavg") else None  # 5-minute load average at the end
    return {
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "load_avg_5min": load,
    }


def torch_dtype(name: str) -> torch.dtype:
    if name not in ("float32", "float64"):
        raise ConfigError(f"dtype must be float32 or float64, got {name!r}")
    return getattr(torch, name)


def command(name: str, cfg, out: str) -> str:
    """The command line that reruns ``name`` with ``cfg`` (options left at their defaults are omitted)."""
    parts = [PROG, name, "--out", str(out)]
    for f in dataclasses.fields(cfg):
        value, default = getattr(cfg, f.name), f.default
        if value != default:
            text = (
                ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
                if isinstance(value, tuple)
                else (f"{value:g}" if isinstance(value, float) else str(value))
            )
            parts += [f"--{f.name.replace('_', '-')}", text]
    return " ".join(parts)


def finish(name: str, cfg, out: str, record: dict, t0: float) -> dict:
    """Add the common fields, write NAME.json, NAME.png, NAME.csv and NAME.md; return the record."""
    from lookahead_dist.experiments import report as rep

    record.update(
        experiment=name,
        config=dataclasses.asdict(cfg),
        command=command(name, cfg, out),
        wall_time_s=time.perf_counter() - t0,
        machine=machine(),
        finished=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{name}.json").write_text(json.dumps(record, indent=1))
    rep.write_outputs(name, record, path)
    return record
