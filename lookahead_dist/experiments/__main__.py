"""``python -m lookahead_dist.experiments``: the paper's experiments and the report."""

import sys

from lookahead_dist.experiments.cli import main

sys.exit(main())
