"""The paper's experiments, rerun on a CPU (``python -m lookahead_dist.experiments``).

:mod:`~lookahead_dist.experiments.fig1`, :mod:`~lookahead_dist.experiments.theorem2`
and :mod:`~lookahead_dist.experiments.slowmo` are the three experiments;
:mod:`~lookahead_dist.experiments.common` what they share (data, batch stream,
schedule and training step are the trainer's, from :mod:`lookahead_dist.train`);
:mod:`~lookahead_dist.experiments.cli` the command line; and
:mod:`~lookahead_dist.experiments.report` turns their outputs into figures,
tables and ``docs/RESULTS.md``.
"""

from lookahead_dist.experiments.cli import EXPERIMENTS, build_parser, config_from_args, main
from lookahead_dist.experiments.common import PROG, ExperimentError, Progress, command
from lookahead_dist.experiments.fig1 import Fig1Config, fig1_run, run_fig1, two_agent_topology
from lookahead_dist.experiments.slowmo import SlowMoConfig, run_slowmo
from lookahead_dist.experiments.theorem2 import Theorem2Config, alpha_grid, run_theorem2

__all__ = [
    "EXPERIMENTS",
    "PROG",
    "ExperimentError",
    "Fig1Config",
    "Progress",
    "SlowMoConfig",
    "Theorem2Config",
    "alpha_grid",
    "build_parser",
    "command",
    "config_from_args",
    "fig1_run",
    "main",
    "run_fig1",
    "run_slowmo",
    "run_theorem2",
    "two_agent_topology",
]
