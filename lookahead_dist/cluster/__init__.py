"""An emulated cluster on one Linux machine: nodes as network namespaces, NICs as shaped veth links.

``python -m lookahead_dist.cluster --nodes 4 --procs-per-node 2 --bandwidth 1gbit -- launch/train.py``
runs the script as 8 ranks with torchrun's environment. Each node's ranks
live in a network namespace of their own, joined to the others through a
bridge in one more namespace; each node's egress is shaped by tc tbf to the
rate; ranks of one node talk through the node's own address, which the kernel
delivers locally and unshaped (the stand-in for NVLink). See
:mod:`~lookahead_dist.cluster.netns` (the network), :mod:`~lookahead_dist.cluster.runs`
(locks and leftovers) and :mod:`~lookahead_dist.cluster.launcher` (ranks).

Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN), iproute2 and util-linux.
Nothing in the core imports this package.
"""

from lookahead_dist.cluster.netns import ClusterError, parse_latency, parse_rate, usable_rate

__all__ = ["ClusterError", "parse_rate", "parse_latency", "usable_rate"]
