"""Write the checkpoint fixtures of tests/test_checkpoint_compat.py with the code it imports.

    cd <a checkout of the commit to freeze> && PYTHONPATH=. python /path/to/tests/_data/make_old_checkpoints.py OUTDIR

Each fixture is ``torch.save({"model": ..., "optimizer": ...})`` of one optimizer wrapper
(Lookahead, Decentralized, SlowMo) after ``STOP`` steps of a tiny float64 model, mid-window
(tau = 3), written by whatever ``lookahead_dist`` is on the path. The test imports the same
builders, so a fixture and its check share one definition of model, data and optimizer. The
run is deterministic (fixed seeds, one process, a one-rank gloo group for the distributed
wrappers), so the files are byte-identical on every run.
"""

from __future__ import annotations

import hashlib
import os
import sys

import torch

KINDS = ("lookahead", "decentralized", "slowmo")
STOP = 5  # steps before the checkpoint: mid-window for tau = 3
TAU = 3
# Fast agent 0 and slow agent 1 (Lookahead, alpha 0.5) both on rank 0.
TWO_AGENTS_ON_ONE_RANK = {"generator": {"type": "two_agent", "alpha": 0.5, "tau": TAU}, "placement": [0, 0]}


def model() -> torch.nn.Module:
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()


def build(kind: str, net: torch.nn.Module):
    """The optimizer wrapper of ``kind`` over ``net`` (the distributed ones need a process group)."""
    from lookahead_dist.comm import Comm
    from lookahead_dist.decentralized import Decentralized
    from lookahead_dist.lookahead import Lookahead
    from lookahead_dist.slowmo import SlowMo

    inner = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    if kind == "lookahead":
        return Lookahead(inner, tau=TAU, alpha=0.5)
    if kind == "decentralized":
        return Decentralized(inner, net, TWO_AGENTS_ON_ONE_RANK, comm=Comm(heartbeat=0))
    if kind == "slowmo":
        return SlowMo(inner, net, tau=TAU, alpha=0.7, beta=0.5, comm=Comm(heartbeat=0))
    raise ValueError(kind)


def train(net: torch.nn.Module, opt, start: int, stop: int) -> None:
    """Steps start .. stop - 1; the batch of step k depends on k only."""
    for k in range(start, stop):
        g = torch.Generator().manual_seed(1000 + k)
        x = torch.randn(8, 3, generator=g, dtype=torch.float64)
        y = torch.randn(8, 1, generator=g, dtype=torch.float64)
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()


def one_rank_group():
    from lookahead_dist import comm

    if not comm.is_initialized():
        comm.init_single_process_group("gloo")


def main(out_dir: str) -> None:
    import lookahead_dist
    from lookahead_dist import comm

    one_rank_group()
    os.makedirs(out_dir, exist_ok=True)
    for kind in KINDS:
        net = model()
        opt = build(kind, net)
        train(net, opt, 0, STOP)
        path = os.path.join(out_dir, f"old_{kind}.pt")
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, path)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        print(f"{path}: {os.path.getsize(path)} bytes, sha256 {digest}")
        if hasattr(opt, "comm"):
            opt.comm.close()
    comm.destroy_process_group()
    print(f"written with {lookahead_dist.__file__}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
