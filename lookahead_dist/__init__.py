"""lookahead_dist: multi-agent, decentralized training on PyTorch.

Every algorithm is a sequence of column-stochastic mixing matrices P_k applied
to a set of agents, X_{k+1} = (X_k - G_k) P_k (Wang et al., eq. 4).
"""
from lookahead_dist.errors import (
    CommError,
    ConfigError,
    DivergenceError,
    LookaheadDistError,
    MixingError,
    TopologyError,
)

__version__ = "0.1.0"

__all__ = [
    "CommError",
    "ConfigError",
    "DivergenceError",
    "LookaheadDistError",
    "MixingError",
    "TopologyError",
]
