"""``python -m lookahead_dist.verify FILE --nproc N``: check a topology on this machine before a GPU run.

Spawns ``--nproc`` gloo processes on the CPU, trains a small float64 model on
the topology and compares every step with the float64 reference engine; a
second run at learning rate 0 measures the consensus rate beside the predicted
one. Exit status 0 when every deviation is within ``--tol`` and the rate is no
worse than predicted, 1 otherwise, 2 for an invalid topology. The work is done
by :func:`lookahead_dist.testing.verify.verify`; this module is its command line.
"""

from __future__ import annotations

import argparse
import sys

from lookahead_dist.errors import LookaheadDistError

__all__ = ["main", "verify"]


def verify(*args, **kwargs) -> bool:
    """:func:`lookahead_dist.testing.verify.verify` (imported on call, so that ``-m`` runs cleanly)."""
    from lookahead_dist.testing.verify import verify as _verify

    return _verify(*args, **kwargs)


def main(argv=None) -> int:
    from lookahead_dist.testing.verify import LR

    ap = argparse.ArgumentParser(prog="python -m lookahead_dist.verify", description=__doc__.split("\n\n")[0])
    ap.add_argument("topology", help="topology YAML file")
    ap.add_argument("--nproc", type=int, required=True, help="number of processes (world size)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--tol", type=float, default=1e-10)
    args = ap.parse_args(argv)
    try:
        ok = verify(args.topology, args.nproc, steps=args.steps, lr=args.lr, tol=args.tol)
    except LookaheadDistError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
