"""The run directory: where it is, and what rank 0 writes there besides the checkpoints.

::

    RUN/config.yaml      the run config, as plain data (new key names)
    RUN/metrics.jsonl    one JSON record per log step
    RUN/summary.json     the final numbers
    RUN/model.pt         the consensus model's state_dict
    RUN/plot.png         training loss and test accuracy against the step
    RUN/checkpoints/     see :mod:`lookahead_dist.train.checkpoint`

Every file is written to a temporary name and moved into place. On several
nodes the run directory must be on a file system that every node sees.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml

from lookahead_dist.comm import Comm
from lookahead_dist.train.config import Config, to_dict

__all__ = ["MetricsLog", "atomic_write", "restart_count", "run_dir", "write_final", "write_text"]


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, then move it into place."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def restart_count() -> int:
    """How often torchrun has restarted this worker group (0 on the first attempt or without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def new_run_path(cfg: Config) -> str:
    """``out_dir``, or the first of runs/<name or timestamp>, runs/<...>-2, ... that does not exist yet."""
    if cfg.out_dir:
        return cfg.out_dir
    stamp = cfg.name or time.strftime("%Y%m%d-%H%M%S")
    chosen, i = f"runs/{stamp}", 1
    while Path(chosen).exists():
        i += 1
        chosen = f"runs/{stamp}-{i}"
    return chosen


def run_dir(cfg: Config, comm: Comm) -> Path:
    """The run directory, created: ``out_dir``, or runs/<name or timestamp> (rank 0 decides, every rank agrees).

    Under torchrun, a pointer file keyed by the run id lets a restarted group find its run directory.
    """
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    pointer = Path("runs") / f".torchrun-{run_id}" if run_id else None
    if not cfg.out_dir and pointer is not None and restart_count() > 0 and pointer.exists():
        chosen = pointer.read_text().strip()
    else:
        chosen = new_run_path(cfg) if comm.rank == 0 else ""
    chosen = comm.all_gather_object(str(Path(chosen).resolve()))[0]  # rank 0 decides
    path = Path(chosen)
    path.mkdir(parents=True, exist_ok=True)
    if pointer is not None and comm.rank == 0 and not cfg.out_dir:
        pointer.parent.mkdir(parents=True, exist_ok=True)
        write_text(pointer, str(path))
    return path


class MetricsLog:
    """metrics.jsonl: rank 0 writes config.yaml and starts the log, keeping the records up to ``start`` of a
    resumed run; ``append`` adds a record (every rank keeps it in ``records``, rank 0 also writes it)."""

    def __init__(self, run: Path, cfg: Config, rank: int, start: int, resume: bool):
        self.path, self.rank = run / "metrics.jsonl", rank
        self.records: list[dict] = []  # this run's log records (rank 0: also those before the checkpoint)
        if rank == 0:
            write_text(run / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
            if resume and self.path.exists():  # drop what was logged after the checkpoint
                self.records = [r for r in map(json.loads, self.path.read_text().splitlines()) if r["step"] <= start]
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, rec: dict) -> None:
        self.records.append(rec)
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


def plot(run: Path, records: list[dict]) -> None:
    """plot.png: the training loss and the test accuracy against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([r["step"] for r in records], [r["loss"] for r in records])
    ax1.set(xlabel="step", ylabel="training loss (mean over workers)", yscale="log")
    acc = [r for r in records if "test_accuracy" in r]
    ax2.plot([r["step"] for r in acc], [r["test_accuracy"] for r in acc], marker="o")
    ax2.set(xlabel="step", ylabel="test accuracy (consensus model)")
    fig.tight_layout()
    fig.savefig(run / "plot.png", dpi=100)
    plt.close(fig)


def write_final(run: Path, summary: dict, model, records: list[dict]) -> None:
    """Rank 0 at the end: summary.json, model.pt (the consensus model) and plot.png (best effort)."""
    write_text(run / "summary.json", json.dumps(summary, indent=1))
    atomic_write(run / "model.pt", lambda p: torch.save(model.state_dict(), p))
    acc, tested, wall, sent = (
        summary[k] for k in ("final_test_accuracy", "test_examples", "wall_time_s", "bytes_sent_per_rank")
    )
    print(
        f"[train] done: test accuracy {acc:.4f} of the consensus model on {tested} "
        f"held-out examples | {summary['steps']} steps | {wall:.1f} s | bytes sent per rank {sent}",
        flush=True,
    )
    try:
        plot(run, records)
    except ImportError:
        print(
            "[train] plot.png not written: matplotlib is not installed (pip install matplotlib)",
            file=sys.stderr,
            flush=True,
        )
    except Exception as exc:  # the plot is a convenience; the run's results are already written
        print(f"[train] warning: plot.png not written: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
