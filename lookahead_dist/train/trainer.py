"""The training loop behind ``launch/train.py``: one worker per rank, any algorithm of the library.

``train(cfg)`` builds the model, the base optimizer with its learning-rate
schedule and the algorithm wrapper, then runs ``steps`` optimizer steps:

=============  ==================================================================================
algorithm      what runs on every rank
=============  ==================================================================================
slowmo         :class:`~lookahead_dist.slowmo.SlowMo` over the gossip topology (null: local steps)
gossip         :class:`~lookahead_dist.decentralized.Decentralized` with the topology file
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

The run directory holds config.yaml, metrics.jsonl (one JSON record per log
step), plot.png, summary.json and checkpoints/ (one file per rank per
checkpoint, and manifest.json, written last, naming the complete one). Each
file is written to a temporary name and moved into place; ``resume`` trusts
only the checkpoint that the manifest names. On several nodes the run
directory must be on a file system that every node sees.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from lookahead_dist import comm as comm_mod
from lookahead_dist.comm import Comm
from lookahead_dist.train.config import Config, resolve_topology, to_dict
from lookahead_dist.train.data import build_data, check_data_path
from lookahead_dist.decentralized import Decentralized
from lookahead_dist.errors import ConfigError, DivergenceError
from lookahead_dist.lookahead import Lookahead
from lookahead_dist.train.models import build_model
from lookahead_dist.slowmo import SlowMo

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
    if not comm_mod.is_initialized():
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
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(params, lr=o.lr, weight_decay=o.weight_decay)


def lr_at(cfg: Config, step: int, total: int, steps_per_epoch: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based): warm-up, then constant, step-wise or cosine."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / (o.warmup_steps + 1)
    if o.schedule == "step":
        unit = steps_per_epoch if o.milestones_in == "epochs" else 1
        return o.lr * o.decay ** sum(step >= m * unit for m in o.milestones)
    if o.schedule == "cosine":
        t = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
        return o.lr * 0.5 * (1.0 + math.cos(math.pi * t))
    return o.lr


def _build_algorithm(cfg: Config, model, optimizer, comm: Comm, device):
    """(step wrapper, module to call): the algorithm of ``cfg.algorithm`` around ``optimizer``."""
    a, W = cfg.algorithm, comm.world_size

    def topology():
        return str(resolve_topology(a.topology, cfg.source))

    def ddp(module):
        if W == 1:
            return module
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)

    common = dict(optimizer_state=a.buffers, shard=a.shard, comm=comm, mix_buffers=a.mix_buffers)
    if a.name == "slowmo":
        return SlowMo(optimizer, model, tau=a.tau, alpha=a.alpha, beta=a.beta,
                      base=topology() if a.topology else None, **common), model
    if a.name == "gossip":
        return Decentralized(optimizer, model, topology(), comm=comm, mix_buffers=a.mix_buffers), model
    if a.name == "local_sgd":
        return SlowMo(optimizer, model, tau=a.tau, alpha=1.0, beta=0.0, base=None, **common), model
    if a.name == "allreduce":
        return optimizer, ddp(model)
    if W == 1:  # lookahead
        return Lookahead(optimizer, tau=a.tau, alpha=a.alpha), model
    opt = SlowMo(optimizer, model, tau=a.tau, alpha=a.alpha, beta=0.0, base=None, **common)
    return opt, ddp(model)


def _push_sum_weight(opt) -> float:
    """This rank's weight in the consensus average: push-sum weight, 0 on a rank with no fast agent, else 1."""
    inner = opt.base if isinstance(opt, SlowMo) and opt.base is not None else opt
    if isinstance(inner, Decentralized):
        return inner.weight if inner.fast_agent is not None else 0.0
    return 1.0


def _state_tensors(model) -> list[torch.Tensor]:
    return list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]


class Consensus:
    """The exact average of the workers' models, computed into a separate evaluation model."""

    def __init__(self, cfg: Config, model, comm: Comm, device):
        self.comm, self.model = comm, model
        self.eval_model = build_model(cfg.model, small_inputs=cfg.data.name == "cifar10").to(device)
        self.eval_model.load_state_dict(model.state_dict())
        self.ranks = list(range(comm.world_size))

    @torch.no_grad()
    def update(self, weight: float) -> float:
        """Load the average into the evaluation model; return the consensus distance of the parameters,
        sqrt(sum_i c_i ||x_i - x_bar||^2 / sum_i c_i) (c_i = 1 for a worker, 0 for a passive rank).

        ``weight``: this rank's weight in the average (push-sum weight; 0 on a passive rank).
        Floating buffers (BatchNorm statistics) are averaged too, but left out of the distance.
        """
        mine = torch.cat([t.detach().reshape(-1) for t in _state_tensors(self.model)]).double()
        nparams = sum(p.numel() for p in self.model.parameters())
        dev = self.comm.device_for_collectives()
        total = torch.cat([mine * weight, torch.tensor([weight], dtype=torch.float64, device=mine.device)]).to(dev)
        self.comm.all_reduce_sum(total, self.ranks)
        avg = (total[:-1] / total[-1]).to(mine.device)
        active = 1.0 if weight > 0 else 0.0
        gap = float((mine[:nparams] - avg[:nparams]).pow(2).sum())
        dist2 = torch.tensor([active * gap, active], dtype=torch.float64, device=dev)
        self.comm.all_reduce_sum(dist2, self.ranks)
        offset = 0
        for t in _state_tensors(self.eval_model):
            t.copy_(avg[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        for (_, dst), (_, src) in zip(self.eval_model.named_buffers(), self.model.named_buffers()):
            if not dst.is_floating_point():
                dst.copy_(src)
        return math.sqrt(float(dist2[0]) / max(float(dist2[1]), 1.0))

    @torch.no_grad()
    def accuracy(self, data) -> float:
        """Test accuracy of the evaluation model; every rank scores its slice of the test set."""
        self.eval_model.eval()
        hits, count = 0, 0
        for x, y in data.test():
            hits += int((self.eval_model(x).argmax(1) == y).sum())
            count += len(y)
        t = torch.tensor([hits, count], dtype=torch.float64, device=self.comm.device_for_collectives())
        self.comm.all_reduce_sum(t, self.ranks)
        return float(t[0] / t[1])


# -- run directory, checkpoints --------------------------------------------------------------


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda p: p.write_text(text))


def _restart_count() -> int:
    """How often torchrun has restarted this worker group (0 on the first attempt or without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _run_dir(cfg: Config, comm: Comm) -> Path:
    # Under torchrun, a pointer file keyed by the run id lets a restarted group find its run directory.
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    pointer = Path("runs") / f".torchrun-{run_id}" if run_id else None
    if cfg.out_dir:
        chosen = cfg.out_dir
    elif pointer is not None and _restart_count() > 0 and pointer.exists():
        chosen = pointer.read_text().strip()
    else:
        stamp = cfg.name or time.strftime("%Y%m%d-%H%M%S")
        chosen, i = f"runs/{stamp}", 1
        while comm.rank == 0 and Path(chosen).exists():
            i += 1
            chosen = f"runs/{stamp}-{i}"
    chosen = comm.all_gather_object(str(Path(chosen).resolve()))[0]  # rank 0 decides
    path = Path(chosen)
    path.mkdir(parents=True, exist_ok=True)
    if pointer is not None and comm.rank == 0 and not cfg.out_dir:
        pointer.parent.mkdir(parents=True, exist_ok=True)
        _write_text(pointer, str(path))
    return path


def _save_checkpoint(run: Path, step: int, comm: Comm, model, opt, bytes_sent: int) -> None:
    ckdir = run / "checkpoints"
    folder = ckdir / f"step_{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"rank_{comm.rank}.pt"
    state = {"step": step, "rank": comm.rank, "world_size": comm.world_size, "model": model.state_dict(),
             "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(), "bytes_sent": bytes_sent}
    _atomic_write(folder / name, lambda p: torch.save(state, p))
    comm.barrier()  # every rank's file is in place before the manifest names them
    if comm.rank == 0:
        files = [f"{folder.name}/rank_{r}.pt" for r in range(comm.world_size)]
        manifest = {"step": step, "world_size": comm.world_size, "files": files}
        _write_text(ckdir / "manifest.json", json.dumps(manifest, indent=1))
        for old in ckdir.glob("step_*"):
            if old.is_dir() and old.name != folder.name:
                for f in old.iterdir():
                    f.unlink()
                old.rmdir()
    comm.barrier()


def _load_checkpoint(run: Path, comm: Comm, model, opt) -> tuple[int, int]:
    """Load this rank's file of the checkpoint named by the manifest; return (step, bytes sent until then)."""
    man_path = run / "checkpoints" / "manifest.json"
    try:
        manifest = json.loads(man_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"resume: no readable checkpoint manifest at {man_path} ({exc})") from None
    if manifest["world_size"] != comm.world_size:
        raise ConfigError(f"resume: {man_path} was written by {manifest['world_size']} rank(s), "
                          f"this run has {comm.world_size}")
    rel = manifest["files"][comm.rank]
    state = torch.load(run / "checkpoints" / rel, map_location="cpu", weights_only=True)
    if state["step"] != manifest["step"] or state["rank"] != comm.rank:
        raise ConfigError(f"resume: {rel} holds step {state['step']} of rank {state['rank']}, the manifest says "
                          f"step {manifest['step']} of rank {comm.rank}")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return int(manifest["step"]), int(state.get("bytes_sent", 0))


def _plot(run: Path, records: list[dict]) -> None:
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


# -- the loop ----------------------------------------------------------------------------------


def _diverged(comm: Comm, step: int, loss: float, run: Path) -> DivergenceError:
    losses = comm.all_gather_object(loss)
    bad = [r for r, v in enumerate(losses) if not math.isfinite(v)]
    manifest = run / "checkpoints" / "manifest.json"
    last = (f"last good checkpoint: step {json.loads(manifest.read_text())['step']} in {manifest.parent}"
            if manifest.exists() else "no checkpoint was written")
    return DivergenceError(f"step {step}: the loss is not finite ({[losses[r] for r in bad]}) on rank(s) {bad}; "
                           f"every rank stops ({last})")


def train(cfg: Config) -> dict:
    """Run the configured training on this rank; return the summary (the same dict on every rank)."""
    t_start = time.perf_counter()
    device = init_distributed(cfg)
    comm = Comm()
    try:
        return _train(cfg, comm, device, t_start)
    finally:
        comm.close()


def _train(cfg: Config, comm: Comm, device, t_start: float) -> dict:
    rank, W = comm.rank, comm.world_size
    if cfg.data.name != "digits":
        check_data_path(cfg)  # before anything is built or written
    run = _run_dir(cfg, comm)
    torch.manual_seed(cfg.seed)  # the same initial model on every rank
    model = build_model(cfg.model, small_inputs=cfg.data.name == "cifar10").to(device)
    optimizer = _optimizer(cfg, model.parameters())
    opt, net = _build_algorithm(cfg, model, optimizer, comm, device)
    active = _push_sum_weight(opt) > 0
    # DistributedDataParallel's gradient all-reduce, counted like the library's all-reduces (a ring: 2 (W-1)/W)
    ddp_bytes = (2 * (W - 1) * sum(p.numel() * p.element_size() for p in model.parameters()) // W
                 if isinstance(net, torch.nn.parallel.DistributedDataParallel) else 0)
    workers = [r for r, a in enumerate(comm.all_gather_object(active)) if a]  # the ranks that take data
    data = build_data(cfg, rank, W, device, shard=(workers.index(rank), len(workers)) if active else (0, 1))
    total = cfg.steps if cfg.steps is not None else max(1, round(cfg.epochs * data.steps_per_epoch))
    consensus = Consensus(cfg, model, comm, device)
    # --resume, or a group that torchrun restarted after a failure: continue from the committed checkpoint
    restarted = _restart_count() > 0 and (run / "checkpoints" / "manifest.json").exists()
    resume = cfg.resume or restarted
    if restarted and rank == 0:
        print(f"[train] restart {_restart_count()} of this torchrun group: resuming from {run / 'checkpoints'}",
              flush=True)
    start, sent_before = _load_checkpoint(run, comm, model, opt) if resume else (0, 0)
    if start >= total:
        raise ConfigError(f"resume: the checkpoint is at step {start}, the run has only {total} steps")
    metrics_path = run / "metrics.jsonl"
    records: list[dict] = []  # this run's log records (rank 0: also those before the checkpoint)
    if rank == 0:
        _write_text(run / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        if resume and metrics_path.exists():  # drop what was logged after the checkpoint
            records = [r for r in map(json.loads, metrics_path.read_text().splitlines()) if r["step"] <= start]
        _write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in records))
        print(f"[train] {cfg.algorithm.name} on {W} rank(s), {device.type}, {cfg.data.name}/{cfg.model.name}: "
              f"{total} steps of batch {cfg.batch_size} per worker ({data.steps_per_epoch} steps per epoch of a "
              f"{data.shard_size}-example shard), from step {start}; run directory {run}", flush=True)
    ranks = list(range(W))

    def sent_bytes(done: int) -> int:
        return sent_before + int(getattr(opt, "bytes_sent", 0)) + ddp_bytes * (done - start)

    batches = data.batches(start) if active else None
    loss_sum, loss_n, t_win, acc = 0.0, 0, time.perf_counter(), None
    nan_here = cfg.debug.nan_step is not None and cfg.debug.nan_rank == rank
    kill_here = cfg.debug.kill_step is not None and cfg.debug.kill_rank == rank and _restart_count() == 0
    net.train()
    for k in range(start, total):
        if kill_here and k == cfg.debug.kill_step:
            os.kill(os.getpid(), signal.SIGKILL)  # testing aid: debug.kill_step / debug.kill_rank
        lr = lr_at(cfg, k, total, data.steps_per_epoch)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_val = 0.0
        if active:
            x, y = next(batches)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y)
            if nan_here and k == cfg.debug.nan_step:
                loss = loss * float("nan")  # testing aid: debug.nan_step / debug.nan_rank
            loss.backward()
            loss_val = float(loss.detach())
        if comm.all_reduce_flag(not math.isfinite(loss_val)):
            err = _diverged(comm, k, loss_val, run)
            comm.barrier()
            raise err
        opt.step()
        loss_sum, loss_n = loss_sum + loss_val, loss_n + (1 if active else 0)
        done = k + 1
        eval_now = done == total or (cfg.eval_every > 0 and done % cfg.eval_every == 0)
        log_now = eval_now or done % cfg.log_every == 0
        if log_now:
            if done == total and hasattr(opt, "finalize"):
                opt.finalize()  # every worker <- the consensus model
            cdist = consensus.update(_push_sum_weight(opt))
            acc = consensus.accuracy(data) if eval_now else acc
            window = torch.tensor([loss_sum, loss_n], dtype=torch.float64, device=comm.device_for_collectives())
            comm.all_reduce_sum(window, ranks)
            now = time.perf_counter()
            rec = {"step": done, "loss": float(window[0] / max(float(window[1]), 1.0)), "lr": lr,
                   "consensus_distance": cdist, "bytes_sent": sent_bytes(done),
                   "samples_per_s": float(window[1]) * cfg.batch_size / max(now - t_win, 1e-9),
                   "wall_time_s": now - t_start}
            if eval_now:
                rec["test_accuracy"] = acc
            records.append(rec)
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(f"[train] step {done:6d}  loss {rec['loss']:.4f}  lr {lr:.4g}  consensus {cdist:.3g}  "
                      f"{rec['samples_per_s']:.0f} samples/s" + (f"  test acc {acc:.4f}" if eval_now else ""),
                      flush=True)
            loss_sum, loss_n, t_win = 0.0, 0, time.perf_counter()
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            _save_checkpoint(run, done, comm, model, opt, sent_bytes(done))
    wall = time.perf_counter() - t_start
    sent = comm.all_gather_object(sent_bytes(total))
    tested = int(sum(comm.all_gather_object(data.test_size)))
    summary = {"final_test_accuracy": acc, "test_examples": tested, "steps": total, "world_size": W,
               "algorithm": cfg.algorithm.name, "wall_time_s": wall, "bytes_sent_per_rank": sent,
               "final_loss": records[-1]["loss"] if records else None, "run_dir": str(run)}
    if rank == 0:
        _write_text(run / "summary.json", json.dumps(summary, indent=1))
        # the consensus model (every worker holds it after finalize), to evaluate and export
        _atomic_write(run / "model.pt", lambda p: torch.save(model.state_dict(), p))
        print(f"[train] done: test accuracy {acc:.4f} of the consensus model on {tested} "
              f"held-out examples | {total} steps | {wall:.1f} s | bytes sent per rank {sent}", flush=True)
        try:
            _plot(run, records)
        except ImportError:
            print("[train] plot.png not written: matplotlib is not installed (pip install matplotlib)",
                  file=sys.stderr, flush=True)
        except Exception as exc:  # the plot is a convenience; the run's results are already written
            print(f"[train] warning: plot.png not written: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    return summary
