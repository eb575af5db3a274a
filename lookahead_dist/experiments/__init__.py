"""The paper's experiments, rerun on a CPU (``python -m lookahead_dist.experiments``).

:mod:`~lookahead_dist.experiments.runs` holds the three experiments and the
command line; :mod:`~lookahead_dist.experiments.report` turns their outputs
into figures, tables and ``docs/RESULTS.md``.
"""

from lookahead_dist.experiments.runs import *  # noqa: F401,F403
from lookahead_dist.experiments.runs import __all__  # noqa: F401
