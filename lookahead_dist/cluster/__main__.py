"""python -m lookahead_dist.cluster --nodes N --procs-per-node P --bandwidth 1gbit [--latency 200us] -- SCRIPT [ARGS]"""

from __future__ import annotations

import argparse
import sys

from lookahead_dist import cluster
from lookahead_dist.cluster.launcher import Options, run
from lookahead_dist.cluster.netns import ClusterError, parse_latency, parse_rate
from lookahead_dist.errors import ConfigError

EPILOG = """\
examples:
  python -m lookahead_dist.cluster --nodes 4 --procs-per-node 2 --bandwidth 1gbit -- launch/train.py
  python -m lookahead_dist.cluster --nodes 2 --procs-per-node 1 --bandwidth 500mbit -m mypkg.bench --size 10M

Each rank gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR (node 0's address),
MASTER_PORT and GLOO_SOCKET_IFNAME (its node's NIC), as under torchrun, plus LOOKAHEAD_DIST_CLUSTER_BANDWIDTH_BITS,
_LATENCY_S, _NODES and _RUN_ID. The exit code is 0 iff every rank exited 0; otherwise the failing rank is named.
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m lookahead_dist.cluster",
        description=cluster.__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--nodes", type=int, required=True, help="number of nodes (network namespaces)")
    parser.add_argument("--procs-per-node", type=int, default=1, help="ranks per node (default 1)")
    parser.add_argument(
        "--bandwidth", required=True, help="each node's egress rate in bits/s, tc style: 1gbit, 500mbit (SI units)"
    )
    parser.add_argument(
        "--latency", default="0", help="one-way delay added to each node's egress, e.g. 200us; needs the netem qdisc"
    )
    parser.add_argument("--master-port", type=int, default=29500, help="MASTER_PORT (default 29500)")
    parser.add_argument(
        "--no-bandwidth-check",
        action="store_true",
        help="only warn when the measured link is more than 10%% off rate x 1448/1514",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=5.0,
        help="seconds the other ranks get to exit after a failure or a signal (default 5)",
    )
    parser.add_argument("-m", "--module", action="store_true", help="run SCRIPT as a module (python -m SCRIPT)")
    parser.add_argument("--no-python", action="store_true", help="run SCRIPT as a program, not with python")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        opts = Options(
            nodes=args.nodes,
            procs_per_node=args.procs_per_node,
            rate_bits=parse_rate(args.bandwidth),
            latency_s=parse_latency(args.latency),
            command=command,
            module=args.module,
            no_python=args.no_python,
            master_port=args.master_port,
            check_bandwidth=not args.no_bandwidth_check,
            grace_s=args.grace,
        )
        return run(opts)
    except ConfigError as exc:
        print(f"python -m lookahead_dist.cluster: error: {exc}", file=sys.stderr)
        return 2
    except ClusterError as exc:
        print(f"python -m lookahead_dist.cluster: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
