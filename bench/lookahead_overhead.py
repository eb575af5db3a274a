"""Step time of Lookahead relative to its inner optimizer alone.

Every ratio is (time of whole tau-step cycles with the optimizer) / (the same
for the bare inner optimizer in the same repetition), the median over
interleaved repetitions; "A/A" is a second bare inner optimizer, the noise. The
"floor" column measures, in the same run, the inner optimizer plus one bare
torch._foreach_lerp_ and one torch._foreach_copy_ over every tensor per
cycle: the least a Lookahead sync can cost. Gradients are fixed random
tensors set once; only optimizer.step() is timed.

If torch_optimizer is installed, its Lookahead is timed in the same loop.

The script re-runs itself with glibc's malloc told to keep freed memory
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_): otherwise the large
temporaries of foreach Adam are mapped and unmapped on every step, and the
page faults make step times depend on allocation history rather than on the
optimizer. --system-malloc turns that off.

    python bench/lookahead_overhead.py [--threads 1] [--reps 21] [--tau 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from lookahead_dist.lookahead import Lookahead

try:  # optional third-party comparison; not a dependency of this project
    import torch_optimizer
except ImportError:  # pragma: no cover - depends on the environment
    torch_optimizer = None

CASES = {"8M params in 4 tensors": (4, 2_000_000), "4M params in 400 tensors": (400, 10_000)}
INNER = {
    "SGD+momentum": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=True),
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
}


def make_params(n_tensors: int, size: int, seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(size, generator=g)) for _ in range(n_tensors)]
    for p in params:
        p.grad = torch.randn(size, generator=g)
    return params


def cycle_timers(make_inner, n_tensors: int, size: int, tau: int) -> dict:
    """One callable per variant; each runs tau optimizer steps and returns the seconds taken."""

    def timed(opt):
        def run():
            start = time.perf_counter()
            for _ in range(tau):
                opt.step()
            return time.perf_counter() - start

        return run

    # Every variant steps the same parameters and gradients (its own optimizer
    # state), so that memory placement of the parameters is not a difference.
    params = make_params(n_tensors, size, 0)
    timers = {"inner": timed(make_inner(params)), "inner (A/A)": timed(make_inner(params))}
    timers["lookahead"] = timed(Lookahead(make_inner(params), tau=tau, alpha=0.5))

    floor_params = params
    floor_inner = make_inner(params)
    floor_slow = [p.detach().clone() for p in floor_params]

    def floor():
        start = time.perf_counter()
        for _ in range(tau):
            floor_inner.step()
        with torch.no_grad():
            torch._foreach_lerp_(floor_slow, floor_params, 0.5)
            torch._foreach_copy_(floor_params, floor_slow)
        return time.perf_counter() - start

    timers["floor"] = floor
    if torch_optimizer is not None:
        timers["torch_optimizer"] = timed(torch_optimizer.Lookahead(make_inner(params), k=tau, alpha=0.5))
    return timers


def measure(timers: dict, reps: int, warmup: int = 2) -> dict:
    """Median over repetitions of each variant's time divided by the inner optimizer's in the same repetition."""
    names = list(timers)
    for _ in range(warmup):
        for name in names:
            timers[name]()
    samples = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate: no fixed position
        for name in order:
            samples[name].append(timers[name]())
    ratios = {
        name: statistics.median(t / i for t, i in zip(values, samples["inner"])) for name, values in samples.items()
    }
    ratios["inner seconds"] = statistics.median(samples["inner"])
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--tau", type=int, default=5)
    parser.add_argument("--system-malloc", action="store_true", help="leave malloc's settings alone")
    args = parser.parse_args()
    if not args.system_malloc and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**32), MALLOC_TRIM_THRESHOLD_=str(2**34))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    torch.set_num_threads(args.threads)

    third = torch_optimizer is not None
    print(
        f"torch {torch.__version__}, threads={args.threads}, tau={args.tau}, "
        f"median of {args.reps} interleaved repetitions of whole cycles, "
        f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}"
    )
    header = f"{'case':26} {'inner':13} {'inner ms/step':>13} {'A/A':>7} {'lookahead':>10} {'floor':>8} {'vs floor':>9}"
    if third:
        header += f" {'torch_optimizer':>16}"
    print(header)
    for case, (n_tensors, size) in CASES.items():
        for inner_name, make_inner in INNER.items():
            med = measure(cycle_timers(make_inner, n_tensors, size, args.tau), args.reps)
            ratio, floor = med["lookahead"], med["floor"]
            line = (
                f"{case:26} {inner_name:13} {1e3 * med['inner seconds'] / args.tau:13.2f} "
                f"{med['inner (A/A)']:7.4f} {ratio:10.4f} {floor:8.4f} {100 * (ratio / floor - 1):+8.2f}%"
            )
            if third:
                line += f" {med['torch_optimizer']:16.4f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
