"""One supervisor per node: host (node 0) or join the job's store, start the node's workers, keep them.

Unlike torchrun's agent, a supervisor never stops a worker because a sibling died:
it writes the death into the store at once (so the survivors need not wait for the
dead member's heartbeat to go stale), restarts the worker if ``--max-restarts``
allows (it then rejoins the running job at the next sync point), and otherwise
lets the others go on. It exits when all its workers have ended; node 0's, which
holds the store, waits (up to ``--exit-timeout`` seconds) until the supervisor of
every node with a member in the job's newest generation has said it is done (a
node whose members were all lost, e.g. a dead machine, is not waited for).

Each worker gets torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT) plus
``LOOKAHEAD_ELASTIC=1`` and ``LOOKAHEAD_ELASTIC_RESTART`` (its incarnation);
MASTER_ADDR/PORT name the supervisor's store, so a worker builds its
:class:`~lookahead_dist.membership.Membership` with ``Membership.from_env()``
instead of ``init_process_group("env://")``.

Exit status: 0 when every worker ended with 0 or was lost to a signal (the job
went on without it), 1 when a worker failed with an error and had no restart left,
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from lookahead_dist.errors import ConfigError
from lookahead_dist.membership import ROOT, View, connect_store, dead_key

__all__ = ["Supervisor", "parse_args", "main"]


def _nnodes(text: str) -> int:
    lo, _, hi = text.partition(":")
    try:
        lo_n, hi_n = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--nnodes: expected N or N:N, got {text!r}") from None
    if lo_n != hi_n or lo_n < 1:
        raise argparse.ArgumentTypeError(
            f"--nnodes: {text!r}; the elastic launcher starts a fixed number of nodes (members come and go "
            "inside the job), give N"
        )
    return lo_n


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m lookahead_dist.elastic",
        description="Start this node's workers; a dead worker does not stop its siblings (torchrun's flags).",
    )
    p.add_argument("--nproc_per_node", "--nproc-per-node", type=int, default=1)
    p.add_argument("--nnodes", type=_nnodes, default=1)
    p.add_argument("--node_rank", "--node-rank", type=int, default=0)
    p.add_argument("--master_addr", "--master-addr", default="127.0.0.1")
    p.add_argument("--master_port", "--master-port", type=int, default=29500)
    p.add_argument("--rdzv_endpoint", "--rdzv-endpoint", default="", help="HOST:PORT, overrides master_addr/port")
    p.add_argument("--standalone", action="store_true", help="one node, a free port on localhost")
    p.add_argument("--max_restarts", "--max-restarts", type=int, default=0, help="restarts per worker")
    p.add_argument("--exit_timeout", "--exit-timeout", type=float, default=60.0)
    p.add_argument("--store_timeout", "--store-timeout", type=float, default=300.0)
    p.add_argument("-m", "--module", action="store_true", help="run the script as a module (python -m)")
    p.add_argument("script")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.rdzv_endpoint:
        host, _, port = args.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit():
            p.error(f"--rdzv_endpoint: expected HOST:PORT, got {args.rdzv_endpoint!r}")
        args.master_addr, args.master_port = host, int(port)
    if args.standalone:
        args.nnodes, args.node_rank, args.master_addr, args.master_port = 1, 0, "127.0.0.1", 0
    for name in ("nproc_per_node", "max_restarts"):
        if getattr(args, name) < (1 if name == "nproc_per_node" else 0):
            p.error(f"--{name}: got {getattr(args, name)}")
    if not 0 <= args.node_rank < args.nnodes:
        p.error(f"--node_rank: must be in 0 .. {args.nnodes - 1}, got {args.node_rank}")
    return args


@dataclass
class _Worker:
    member: int
    local: int
    incarnation: int
    proc: subprocess.Popen | None = None
    restarts_left: int = 0
    final: int | None = None


class Supervisor:
    """This node's supervisor (see the module docstring)."""

    def __init__(self, args: argparse.Namespace, log=None):
        self.args = args
        self.log = log or (lambda msg: print(f"[elastic node {args.node_rank}] {msg}", file=sys.stderr, flush=True))
        self.world = args.nnodes * args.nproc_per_node
        host = args.node_rank == 0
        self.store = connect_store(args.master_addr, args.master_port, args.store_timeout, is_master=host)
        self.port = self.store.port if host else args.master_port
        self.workers = [
            _Worker(args.node_rank * args.nproc_per_node + i, i, 0, restarts_left=args.max_restarts)
            for i in range(args.nproc_per_node)
        ]
        self._stopping = False
        self._gen, self._expected = 0, set(range(args.nnodes))  # the next generation to read, its nodes

    def _env(self, w: _Worker) -> dict:
        env = dict(os.environ)
        env.update(
            RANK=str(w.member),
            LOCAL_RANK=str(w.local),
            WORLD_SIZE=str(self.world),
            LOCAL_WORLD_SIZE=str(self.args.nproc_per_node),
            GROUP_RANK=str(self.args.node_rank),
            NODE_RANK=str(self.args.node_rank),
            MASTER_ADDR=self.args.master_addr,
            MASTER_PORT=str(self.port),
            LOOKAHEAD_ELASTIC="1",
            LOOKAHEAD_ELASTIC_RESTART=str(w.incarnation),
        )
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def _start(self, w: _Worker) -> None:
        cmd = [sys.executable, "-u"] + (["-m"] if self.args.module else []) + [self.args.script]
        w.proc = subprocess.Popen(cmd + list(self.args.script_args), env=self._env(w))
        self.log(f"member {w.member} (incarnation {w.incarnation}) started, pid {w.proc.pid}")

    def _stop(self, signum, _frame) -> None:
        self._stopping = True
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)

    def run(self) -> int:
        old = {s: signal.signal(s, self._stop) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for w in self.workers:
                self._start(w)
            while any(w.final is None for w in self.workers):
                for w in self.workers:
                    if w.final is not None or w.proc.poll() is None:
                        continue
                    rc = w.proc.returncode
                    if rc == 0:
                        w.final = 0
                        self.log(f"member {w.member} finished")
                        continue
                    self._report_death(w, rc)
                    how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
                    if w.restarts_left > 0 and not self._stopping:
                        w.restarts_left -= 1
                        w.incarnation += 1
                        self.log(f"member {w.member} lost ({how}); restarting it to rejoin")
                        self._start(w)
                    else:
                        w.final = rc
                        self.log(f"member {w.member} lost ({how}); the others go on without it")
                time.sleep(0.02)
            self._wait_for_other_nodes()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self._stop(None, None)
            for w in self.workers:
                if w.proc is not None:
                    try:
                        w.proc.wait(10)
                    except subprocess.TimeoutExpired:
                        w.proc.kill()
                        w.proc.wait()
        return 1 if any(w.final > 0 for w in self.workers) else 0

    def _report_death(self, w: _Worker, rc: int) -> None:
        """Tell the survivors at once (they need not wait for the heartbeat to go stale)."""
        try:
            self.store.set(dead_key(w.member, w.incarnation, root=True), str(rc))
        except Exception as exc:  # the store's host is gone: the workers stop on their own, naming it
            self.log(f"cannot report member {w.member}'s death: the store is unreachable ({exc})")

    def _expected_nodes(self) -> set[int]:
        """The nodes with a member in the newest generation written to the store (all of them before the first);
        generations already read are not read again."""
        while self.store.check([f"{ROOT}/gen/{self._gen}/members"]):
            members = View.from_json(self.store.get(f"{ROOT}/gen/{self._gen}/members")).members
            self._expected = {m // self.args.nproc_per_node for m in members}
            self._gen += 1
        return self._expected

    def _wait_for_other_nodes(self) -> None:
        try:
            self.store.set(f"{ROOT}/supervisor_done/{self.args.node_rank}", "1")
        except Exception as exc:
            self.log(f"the store is unreachable at the end ({exc})")
            return
        if self.args.node_rank != 0:
            return
        deadline = time.monotonic() + self.args.exit_timeout
        while True:
            waiting = sorted(n for n in self._expected_nodes() if not self.store.check([f"{ROOT}/supervisor_done/{n}"]))
            if not waiting:
                return
            if time.monotonic() >= deadline:
                self.log(f"nodes {waiting} did not say they were done within {self.args.exit_timeout} s")
                return
            time.sleep(0.1)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return Supervisor(args).run()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
