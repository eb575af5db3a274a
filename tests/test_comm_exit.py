"""A script that owns its process group and builds several optimizers exits 0, every time.

The heartbeat threads of :class:`lookahead_dist.comm.Comm` are daemons that call into the store with the GIL
released; one still inside such a call when the interpreter finalizes aborts the process ("terminate called
without an active exception"). These tests run launch/examples/many_optimizers.py under torchrun several times,
in both import orders, and check the mechanisms that prevent it in one process.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from lookahead_dist.train.config import REPO_ROOT

pytestmark = pytest.mark.dist

SCRIPT = str(REPO_ROOT / "launch" / "examples" / "many_optimizers.py")
RUNS = 5


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _torchrun(*args, timeout=60.0):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=4",
        SCRIPT,
        "--steps",
        "2",
        *args,
    ]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("order", ["import-before", "import-after"])
def test_many_optimizers_exit_cleanly(order):
    args = ["--import-after"] if order == "import-after" else []
    for i in range(RUNS):
        proc = _torchrun(*args)
        where = f"run {i + 1} of {RUNS} ({order})"
        assert "terminate called" not in proc.stderr, where + "\n" + proc.stderr[-3000:]
        assert proc.returncode == 0, where + "\n" + proc.stdout[-2000:] + proc.stderr[-3000:]
        assert proc.stdout.splitlines()[-1] == "done", where + "\n" + proc.stdout


def _one_rank(body: str) -> str:
    """Run ``body`` in a fresh interpreter holding a 1-rank gloo group on an in-process TCP store; its stdout."""
    code = textwrap.dedent("""
        import datetime, gc, threading, time
        import torch.distributed as dist
        from lookahead_dist import comm
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=30))
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        def beats():
            return sorted(t.name for t in threading.enumerate() if t.name.startswith("lookahead_dist-heartbeat"))
    """) + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert "terminate called" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_heartbeats_stop_on_close_collection_destroy_and_exit():
    out = _one_rank("""
        a, b = comm.Comm(heartbeat=0.01), comm.Comm(heartbeat=0.01)
        print("started", beats())
        a.close(); a.close()
        print("closed", beats())
        del b; gc.collect(); time.sleep(0.2)
        print("collected", beats())
        c = comm.Comm(heartbeat=0.01)
        dist.destroy_process_group(); time.sleep(0.2)
        print("destroyed", beats())
        dist.init_process_group("gloo", store=dist.PrefixStore("again", store), rank=0, world_size=1)
        # Busy heartbeats (almost always inside a store call) that nobody closes: the exit hook joins them.
        keep = [comm.Comm(heartbeat=1e-4) for _ in range(4)]
        print("left", len(beats()))
    """)
    assert out.splitlines() == [
        "started ['lookahead_dist-heartbeat-0', 'lookahead_dist-heartbeat-0']",
        "closed ['lookahead_dist-heartbeat-0']",
        "collected []",
        "destroyed []",
        "left 4",
    ]


def test_destroyed_group_is_not_kept_by_torch_distributed_nn():
    # torch.distributed.nn.functional's defaults (group=group.WORLD) would hold a group that exists when it is
    # first imported; importing lookahead_dist before the group imports it while the defaults are still None.
    out = _one_rank("""
        import weakref
        import torch, torch.distributed.nn.functional as F
        m = torch.nn.Linear(2, 2)
        torch.optim.SGD(m.parameters(), lr=0.1)  # imports torch._dynamo, after init_process_group
        print("defaults", F.all_reduce.__defaults__[-1])
    """)
    assert out.splitlines() == ["defaults None"]


def test_group_held_by_torch_distributed_nn_is_freed_after_destroy():
    # lookahead_dist imported after init_process_group: torch.distributed.nn.functional's defaults hold the group;
    # release_destroyed_groups (called at exit too) drops it once destroyed, so its gloo threads end before
    # interpreter finalization.
    code = textwrap.dedent("""
        import os, torch, torch.distributed as dist
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        from lookahead_dist import comm
        import torch.distributed.nn.functional as F
        threads = lambda: len(os.listdir("/proc/self/task"))
        alone = threads()
        held = type(F.all_reduce.__defaults__[-1]).__name__
        dist.destroy_process_group()
        comm.release_destroyed_groups()
        print(held, F.all_reduce.__defaults__[-1], threads() < alone)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ProcessGroup", "None", "True"]
