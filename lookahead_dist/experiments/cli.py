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

from lookahead_dist.experiments import report as rep
from lookahead_dist.experiments.common import PROG
from lookahead_dist.experiments.fig1 import Fig1Config, run_fig1
from lookahead_dist.experiments.slowmo import SlowMoConfig, run_slowmo
from lookahead_dist.experiments.theorem2 import Theorem2Config, run_theorem2

__all__ = ["EXPERIMENTS", "build_parser", "config_from_args", "main"]

EXPERIMENTS = {"fig1": Fig1Config, "theorem2": Theorem2Config, "slowmo": SlowMoConfig}


def _tuple_of(kind):
    """An argparse type: "0.2,0.5" -> (0.2, 0.5)."""

    def conv(text: str) -> tuple:
        return tuple(kind(v) for v in text.split(",") if v.strip())

    return conv


def _add_options(parser: argparse.ArgumentParser, cls) -> None:
    for f in dataclasses.fields(cls):
        default = f.default
        if isinstance(default, tuple):
            conv = _tuple_of(float if any(isinstance(v, float) for v in default) else int)
            shown = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
        else:
            conv, shown = type(default), default
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", dest=f.name, type=conv, default=default, help=f"(default {shown})"
        )


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per experiment (its configuration's fields as flags), report, all."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="name", required=True)
    for name, cls in EXPERIMENTS.items():
        p = sub.add_parser(name, help=f"run {name}")
        p.add_argument("--out", default="results", help="output directory (default results)")
        _add_options(p, cls)
    for name in ("report", "all"):
        p = sub.add_parser(
            name,
            help="write DOCS/RESULTS.md from the outputs"
            if name == "report"
            else "run fig1, theorem2 and slowmo with their defaults, then report",
        )
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
    path = rep.write_results_md(args.out, args.docs)
    print(f"wrote {path}")
    return 0
