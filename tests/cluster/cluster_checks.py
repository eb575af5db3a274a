"""Run on a 2-node x 2-rank emulated cluster by tests/cluster/test_cluster.py: timings and environment, as JSON.

Ranks 0, 1 are on node 0 and ranks 2, 3 on node 1. Every time is taken at the
receiver, after a barrier, as the median of a few repetitions:

- ``one_way``: rank 0 -> rank 2 (crosses the shaped link);
- ``intra``: rank 0 -> rank 1 (the node's own address: local, unshaped);
- ``exchange``: ranks 0 and 2 swap buffers through ``Comm.exchange`` (both directions at once);
- ``sends_first``: the same swap with the sends posted before the receives (for comparison only).

Usage: python cluster_checks.py OUT.json [MBYTES]
"""

import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from lookahead_dist.comm import Comm, init_process_group

REPS = 3


def timed(fn):
    out = []
    for _ in range(REPS):
        dist.barrier()
        t0 = time.perf_counter()
        if fn():
            out.append(time.perf_counter() - t0)
    return statistics.median(out) if out else None


def main():
    path, mbytes = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 16.0
    init_process_group("gloo", timeout_s=60)
    comm = Comm(heartbeat=0)
    rank = comm.rank
    n = int(mbytes * 2**20) // 4
    send, recv = torch.ones(n), torch.empty(n)

    def p2p(src, dst):
        def step():
            if rank == src:
                dist.send(send, dst)
            elif rank == dst:
                dist.recv(recv, src)
                return True

        return step

    def swap(a, b, fixed):
        peer = {a: b, b: a}.get(rank)

        def step():
            if peer is None:
                return False
            if fixed:
                comm.exchange([(peer, send)], [(peer, recv)])
            else:  # the order Comm.exchange used before: every send, then every receive
                for req in dist.batch_isend_irecv(
                    [dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, recv, peer)]
                ):
                    req.wait()
            return True

        return step

    p2p(0, 2)(), p2p(2, 0)(), p2p(0, 1)()  # warm up: connections and buffers
    result = {
        "one_way": timed(p2p(0, 2)),
        "intra": timed(p2p(0, 1)),
        "exchange": timed(swap(0, 2, True)),
        "sends_first": timed(swap(0, 2, False)),
        "bytes": n * 4,
        "pid": os.getpid(),
        "env": {
            k: os.environ.get(k)
            for k in (
                "RANK",
                "LOCAL_RANK",
                "WORLD_SIZE",
                "LOCAL_WORLD_SIZE",
                "MASTER_ADDR",
                "MASTER_PORT",
                "GLOO_SOCKET_IFNAME",
                "LOOKAHEAD_DIST_CLUSTER_BANDWIDTH_BITS",
            )
        },
    }
    everything = comm.all_gather_object(result)
    if rank == 0:
        with open(path, "w") as f:
            json.dump(everything, f, indent=1)
    comm.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
