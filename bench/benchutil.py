"""Shared by the benchmark scripts: the order in which variants are interleaved, and the harness of the
spawned-rank throughput benchmarks (bench/slowmo.py, bench/outer.py): the MLP, its random batches, the
timed windows of steps in rotation and the slowest rank's time per round."""

from __future__ import annotations


def rotation(names: list, rep: int) -> list:
    """The order of repetition ``rep``: rotated by one each repetition, reversed every other cycle.

    Every variant thus runs at every position and after each of its two neighbours; the order is the
    same on every rank (the collectives of the variants must line up).
    """
    shift = rep % len(names)
    order = names[shift:] + names[:shift]
    return order[::-1] if (rep // len(names)) % 2 else order


def mlp(cfg: dict):
    """A ReLU MLP of ``cfg``'s d_in, hidden x layers and classes, the same start on every rank (seed 0)."""
    import torch

    torch.manual_seed(0)
    d_in, hidden, layers, classes = cfg["d_in"], cfg["hidden"], cfg["layers"], cfg["classes"]
    mods = [torch.nn.Linear(d_in, hidden), torch.nn.ReLU()]
    for _ in range(layers - 1):
        mods += [torch.nn.Linear(hidden, hidden), torch.nn.ReLU()]
    mods.append(torch.nn.Linear(hidden, classes))
    return torch.nn.Sequential(*mods)


def random_batches(cfg: dict, rank: int, count: int = 8) -> list:
    """``count`` batches of ``cfg['batch']`` random inputs and labels, this rank's own."""
    import torch

    g = torch.Generator().manual_seed(1000 + rank)
    return [
        (
            torch.randn(cfg["batch"], cfg["d_in"], generator=g),
            torch.randint(cfg["classes"], (cfg["batch"],), generator=g),
        )
        for _ in range(count)
    ]


def timed_windows(runs: dict, batches: list, steps: int, warmup: int, rounds: int) -> tuple[dict, dict]:
    """Every run (name -> (module, optimizer)) in rotation, ``warmup + rounds`` windows of ``steps`` steps each
    (barrier, t0, the steps, t1); returns (name -> window seconds, name -> steps taken)."""
    import time

    import torch
    import torch.distributed as dist

    loss_fn = torch.nn.functional.cross_entropy
    step_no = {name: 0 for name in runs}

    def window(name: str) -> float:
        net, opt = runs[name]
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            x, y = batches[step_no[name] % len(batches)]
            opt.zero_grad(set_to_none=False)
            loss_fn(net(x), y).backward()
            opt.step()
            step_no[name] += 1
        return time.perf_counter() - t0

    names = list(runs)
    times = {name: [] for name in names}
    for rnd in range(warmup + rounds):
        for name in rotation(names, rnd):
            times[name].append(window(name))
    return times, step_no


def slowest_per_round(results: list[dict], cfg: dict) -> dict:
    """name -> the slowest rank's window time in each measured round (the warm-up dropped)."""
    rounds, skip = cfg["rounds"], cfg["warmup"]
    names = list(results[0]["times"])
    return {n: [max(r["times"][n][skip + i] for r in results) for i in range(rounds)] for n in names}
