"""Train with any algorithm of lookahead_dist, one worker per rank.

torchrun --standalone --nproc_per_node=4 launch/train.py                  # the default: digits, SlowMo on a ring
torchrun --standalone --nproc_per_node=4 launch/train.py --config launch/configs/digits_gossip.yaml
python launch/train.py --set steps=200 --set optim.lr=0.05                # one process
torchrun ... launch/train.py --out runs/a --resume                        # continue from the last checkpoint
"""

import argparse
import os
import sys

from lookahead_dist.comm import destroy_process_group
from lookahead_dist.errors import LookaheadDistError
from lookahead_dist.train.config import load_config
from lookahead_dist.train.trainer import train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config (YAML); default: the built-in digits run")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set optim.lr=0.05 (repeatable)",
    )
    parser.add_argument("--out", help="run directory (default: runs/<name or timestamp>)")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    args = parser.parse_args(argv)
    overrides = args.overrides + ([f"out_dir={args.out}"] if args.out else [])
    overrides += ["resume=true"] if args.resume else []
    try:
        train(load_config(args.config, overrides))
    except LookaheadDistError as exc:
        print(f"[rank {os.environ.get('RANK', 0)}] {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
