"""lookahead_dist: multi-agent, decentralized training on PyTorch.

Every algorithm is a sequence of column-stochastic mixing matrices P_k applied
to a set of agents, X_{k+1} = (X_k - G_k) P_k (Wang et al., eq. 4).
"""

from lookahead_dist import comm
from lookahead_dist.decentralized import Decentralized, run_passive
from lookahead_dist.errors import (
    CheckpointError,
    CommError,
    ConfigError,
    DivergenceError,
    InFlightError,
    LookaheadDistError,
    MembershipError,
    MixingError,
    TopologyError,
)
from lookahead_dist.lookahead import Lookahead
from lookahead_dist.membership import Membership
from lookahead_dist.mixing import Schedule, consensus_rate, invariant_vector, lookahead_matrix
from lookahead_dist.slowmo import SlowMo

__version__ = "0.1.0"


def __getattr__(name):
    # topology is imported on first use, so that `python -m lookahead_dist.topology` runs it cleanly
    if name in ("Topology", "load"):
        from lookahead_dist import topology

        return getattr(topology, name)
    if name == "Elastic":  # imports the topology module too (see above)
        from lookahead_dist.regroup import Elastic

        return Elastic
    raise AttributeError(f"module 'lookahead_dist' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "CommError",
    "ConfigError",
    "Decentralized",
    "DivergenceError",
    "Elastic",
    "InFlightError",
    "Lookahead",
    "LookaheadDistError",
    "Membership",
    "MembershipError",
    "MixingError",
    "Schedule",
    "SlowMo",
    "Topology",
    "TopologyError",
    "comm",
    "consensus_rate",
    "invariant_vector",
    "load",
    "lookahead_matrix",
    "run_passive",
]
