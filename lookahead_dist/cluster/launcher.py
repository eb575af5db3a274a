"""Run a script as N x P ranks on the emulated cluster, supervise them, and remove everything afterwards.

:func:`run` is what ``python -m lookahead_dist.cluster`` calls. In order:

1. refuses at once without the privilege, or with a latency where the kernel
   has no netem (:mod:`lookahead_dist.cluster.netns`);
2. removes what killed runs left behind and locks a fresh run id and subnet
   (:mod:`lookahead_dist.cluster.runs`);
3. builds the namespaces, bridge, veths and qdiscs;
4. measures the bandwidth from node 0 to node 1 with a raw TCP transfer
   timed at the receiver and prints it; outside 10 % of rate x 1448/1514 the
   run stops (every timing taken on a link that is not at its rate would be
   silently wrong; the usual cause is a CPU too busy to move the traffic) unless
   ``check_bandwidth=False``, which only warns;
5. starts the ranks with torchrun's environment, each inside its node's
   namespace, in a session of its own, with a parent-death signal so that a
   launcher killed by SIGKILL takes its ranks with it;
6. waits: the first rank that exits non-zero stops the others, and the run
   fails naming it; SIGINT, SIGTERM and SIGHUP are passed on to the ranks;
7. in every case (normal end, a failed rank, a signal, an error) kills what
   is left inside the run's namespaces, deletes them and releases the lock.
   After SIGKILL of the launcher the next start does this.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from lookahead_dist.cluster import runs
from lookahead_dist.cluster.netns import (
    ClusterError,
    Network,
    netem_problem,
    privilege_problem,
    remove_namespaces,
    run_namespaces,
    tbf_params,
    usable_rate,
)
from lookahead_dist.errors import ConfigError

__all__ = ["Options", "run", "measure_bandwidth", "rank_env"]

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "probe.py")
PROBE_PORT = 29400
BANDWIDTH_TOLERANCE = 0.10


@dataclass
class Options:
    """What to run and on which emulated cluster (rates in bits/s, times in seconds)."""

    nodes: int
    procs_per_node: int
    rate_bits: float
    command: Sequence[str]  # the script and its arguments (or a module / program, see below)
    latency_s: float = 0.0
    module: bool = False  # run ``python -m command[0]``
    no_python: bool = False  # run ``command[0]`` itself
    master_port: int = 29500
    probe_bytes: int = 17 << 20  # the receiver's clock starts after its first read (<= 1 MiB): >= 16 MiB timed
    check_bandwidth: bool = True
    grace_s: float = 5.0  # after the first failure or a signal: how long ranks may take to exit
    python: str = sys.executable
    extra_env: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.nodes < 1 or self.nodes > 250:
            raise ConfigError(f"--nodes: must be between 1 and 250, got {self.nodes}")
        if self.procs_per_node < 1:
            raise ConfigError(f"--procs-per-node: must be at least 1, got {self.procs_per_node}")
        if not self.command:
            raise ConfigError("no script given: write it after '--', e.g. -- launch/train.py --config c.yaml")
        if self.probe_bytes < 17 << 20:
            raise ConfigError(
                f"probe_bytes: the bandwidth probe needs at least 17 MiB (16 MiB timed), got {self.probe_bytes}"
            )
        if not 1 <= self.master_port <= 65535 or self.master_port == PROBE_PORT:
            raise ConfigError(
                f"--master-port: must be a port in 1..65535 other than {PROBE_PORT}, got {self.master_port}"
            )


class _Stop(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stop(signum, _frame):
    raise _Stop(signum)


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass


def rank_env(net: Network, opts: Options, node: int, local_rank: int) -> dict[str, str]:
    """torchrun's variables for one rank, plus GLOO_SOCKET_IFNAME and the cluster's own description."""
    world = opts.nodes * opts.procs_per_node
    env = dict(os.environ)
    for key in ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(key, None)  # inherited from an outer torchrun they would send the ranks to its store
    env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun does with several processes per machine
    env.update(
        {
            "RANK": str(node * opts.procs_per_node + local_rank),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(opts.procs_per_node),
            "GROUP_RANK": str(node),
            "NODE_RANK": str(node),
            "ROLE_RANK": str(node * opts.procs_per_node + local_rank),
            "ROLE_WORLD_SIZE": str(world),
            "MASTER_ADDR": net.address(0),
            "MASTER_PORT": str(opts.master_port),
            "TORCHELASTIC_RUN_ID": f"cluster-{net.run_id}",
            # without it gloo advertises the hostname's address (127.0.0.1 here) and the other nodes hang
            "GLOO_SOCKET_IFNAME": net.ifname(node),
            "NCCL_SOCKET_IFNAME": net.ifname(node),
            "LOOKAHEAD_DIST_CLUSTER_RUN_ID": net.run_id,
            "LOOKAHEAD_DIST_CLUSTER_NODES": str(opts.nodes),
            "LOOKAHEAD_DIST_CLUSTER_BANDWIDTH_BITS": str(int(opts.rate_bits)),
            "LOOKAHEAD_DIST_CLUSTER_LATENCY_S": repr(opts.latency_s),
        }
    )
    env.update({k: str(v) for k, v in opts.extra_env.items()})
    return env


def measure_bandwidth(
    net: Network, nbytes: int, python: str = sys.executable, src: int = 0, dst: int = 1
) -> tuple[float, int]:
    """(TCP payload bytes/s, bytes timed) from node ``src`` to node ``dst``: one stream of ``nbytes``.

    Timed at the receiver, from its first read to its last; the first read's bytes are not counted.
    """
    recv = subprocess.Popen(
        net.enter(dst) + [python, PROBE, "recv", net.address(dst), str(PROBE_PORT), str(nbytes)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if recv.stdout.readline().strip() != "listening":
            raise ClusterError(f"the bandwidth probe's receiver did not start: {recv.stderr.read().strip()}")
        sent = subprocess.run(
            net.enter(src) + [python, PROBE, "send", net.address(dst), str(PROBE_PORT), str(nbytes)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
        out, err = recv.communicate(timeout=120)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    if sent.returncode != 0 or recv.returncode != 0:
        raise ClusterError(f"the bandwidth probe failed: {(sent.stderr + err).strip()}")
    result = json.loads(out.strip().splitlines()[-1])
    return result["bytes"] / result["seconds"], result["bytes"]


def _check_link(net: Network, opts: Options, log: Callable[[str], None]) -> None:
    expected = usable_rate(opts.rate_bits)
    best, timed = 0.0, 0
    for _attempt in range(3):  # another process may have had the CPU for a moment: the best of three
        rate, nbytes = measure_bandwidth(net, opts.probe_bytes, opts.python)
        if rate > best:
            best, timed = rate, nbytes
        if abs(best / expected - 1) <= BANDWIDTH_TOLERANCE:
            break
    err = best / expected - 1
    log(
        f"bandwidth node 0 -> node 1: {best * 8 / 1e9:.3f} Gbit/s of TCP payload ({best / 1e6:.1f} MB/s, "
        f"{timed / 2**20:.1f} MiB timed at the receiver); expected {expected * 8 / 1e9:.3f} Gbit/s "
        f"= rate x 1448/1514 ({err:+.1%})"
    )
    if abs(err) > BANDWIDTH_TOLERANCE:
        why = (
            "slower: the CPUs cannot move this much shaped traffic (lower --bandwidth or the load on the machine)"
            if err < 0
            else "faster: the qdisc is not shaping the link"
        )
        msg = (
            f"the link measured {best * 8 / 1e9:.3f} Gbit/s, {err:+.1%} off the expected "
            f"{expected * 8 / 1e9:.3f} Gbit/s (more than {BANDWIDTH_TOLERANCE:.0%}), {why}"
        )
        if opts.check_bandwidth:
            raise ClusterError(msg + "; --no-bandwidth-check runs anyway")
        log("WARNING: " + msg)


def _start_ranks(net: Network, opts: Options) -> list[tuple[int, int, int, subprocess.Popen]]:
    if opts.no_python:
        argv = list(opts.command)
    elif opts.module:
        argv = [opts.python, "-m", *opts.command]
    else:
        argv = [opts.python, *opts.command]
    procs = []
    for node in range(opts.nodes):
        for local in range(opts.procs_per_node):
            rank = node * opts.procs_per_node + local
            p = subprocess.Popen(
                net.enter(node) + argv,
                env=rank_env(net, opts, node, local),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            procs.append((rank, node, local, p))
    return procs


def _signal_all(procs, sig: int) -> None:
    for _rank, _node, _local, p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def _supervise(procs, opts: Options, log: Callable[[str], None]) -> int:
    """Wait for every rank; on the first failure stop the rest. Returns the run's exit code."""
    while True:
        failed = [(r, n, lr, p) for r, n, lr, p in procs if p.poll() not in (None, 0)]
        if failed:
            rank, node, local, p = failed[0]
            code = p.returncode
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            log(f"rank {rank} (node {node}, local rank {local}) {how}; stopping the other ranks")
            _signal_all(procs, signal.SIGTERM)
            _wait_all(procs, opts.grace_s)
            return 128 - code if code < 0 else code
        if all(p.poll() == 0 for *_x, p in procs):
            return 0
        time.sleep(0.05)


def _wait_all(procs, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for *_x, p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for *_x, p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def run(opts: Options, log: Callable[[str], None] | None = None) -> int:
    """Run ``opts.command`` on an emulated cluster; the exit code is 0 iff every rank exited 0."""
    log = log or (lambda msg: print(f"[cluster] {msg}", file=sys.stderr, flush=True))
    opts.validate()
    problem = privilege_problem()
    if problem:
        raise ClusterError(problem)
    if opts.latency_s > 0:
        problem = netem_problem()
        if problem:
            raise ClusterError(f"--latency {opts.latency_s * 1e6:g}us refused: {problem}")
    runs.clean_leftovers(log=log)
    lock = runs.acquire()
    net = Network(lock.run_id, opts.nodes, lock.subnet, opts.rate_bits, opts.latency_s)
    handlers = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    procs: list = []
    code = 1
    try:
        burst, limit = tbf_params(opts.rate_bits)
        log(
            f"run {net.run_id}: {opts.nodes} node(s) x {opts.procs_per_node} rank(s) on 10.{net.subnet[0]}."
            f"{net.subnet[1]}.0/24, egress tbf {opts.rate_bits / 1e9:g} Gbit/s burst {burst} B limit {limit} B"
            + (f", netem delay {opts.latency_s * 1e6:g} us" if opts.latency_s > 0 else "")
        )
        net.build()
        if opts.nodes >= 2:
            _check_link(net, opts, log)
        else:
            log("one node: no link between nodes to measure")
        procs = _start_ranks(net, opts)
        code = _supervise(procs, opts, log)
    except _Stop as stop:
        log(f"{stop} received: stopping the ranks and removing the cluster")
        _signal_all(procs, stop.signum)
        _wait_all(procs, opts.grace_s)
        code = 128 + stop.signum
    finally:
        for s in handlers:  # a second Ctrl-C must not interrupt the removal
            signal.signal(s, signal.SIG_IGN)
        try:
            _wait_all(procs, 0.0)
            failed = remove_namespaces(run_namespaces(net.run_id), grace_s=0.5)
            if failed:
                log(f"could not delete namespace(s) {failed}; the next start removes them")
            else:
                lock.release()
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
    return code
