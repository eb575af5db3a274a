"""Two elastic supervisors as two "nodes" of two workers on this machine, for the launcher's tests."""

from __future__ import annotations

import os
import signal
import socket
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_cmd(node_rank: int, port: int, *rest: str, exit_timeout: float = 60) -> list[str]:
    """``python -m lookahead_dist.elastic`` for node ``node_rank`` of 2 (2 workers each), store on ``port``."""
    return [
        sys.executable,
        "-m",
        "lookahead_dist.elastic",
        "--nproc_per_node=2",
        "--nnodes=2",
        f"--node_rank={node_rank}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        f"--exit-timeout={exit_timeout}",
        *rest,
    ]


def kill_all(procs) -> None:
    """SIGKILL each process's group (a supervisor and every worker it started: each runs in a session of its own)."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
