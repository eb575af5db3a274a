"""Several optimizer wrappers in one script that owns its process group, then a clean exit.

    torchrun --standalone --nproc_per_node=4 launch/examples/many_optimizers.py
    torchrun --standalone --nproc_per_node=4 launch/examples/many_optimizers.py --import-after

The script calls torch.distributed.init_process_group itself (not through lookahead_dist.comm),
builds Decentralized (ring, push-sum) and SlowMo (local SGD, and over a ring) in turn, trains a few
steps with each, destroys the group and returns. With --import-after it imports lookahead_dist only
after the process group exists. Every rank must exit with status 0.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def train(opt, model, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 8, generator=g)
        y = x.sum(dim=1, keepdim=True)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--import-after", action="store_true", help="import lookahead_dist after init_process_group")
    ap.add_argument("--steps", type=int, default=4, help="steps per optimizer (default 4)")
    args = ap.parse_args(argv)

    if not args.import_after:
        import lookahead_dist
    dist.init_process_group("gloo")
    if args.import_after:
        import lookahead_dist
    rank = dist.get_rank()
    topologies = os.path.join(ROOT, "topologies")

    builders = [
        ("ring", lambda opt, m: lookahead_dist.Decentralized(opt, m, os.path.join(topologies, "ring.yaml"))),
        (
            "push-sum",
            lambda opt, m: lookahead_dist.Decentralized(opt, m, os.path.join(topologies, "directed_push_sum.yaml")),
        ),
        ("local", lambda opt, m: lookahead_dist.SlowMo(opt, m, tau=2, base=None)),
        (
            "slowmo-ring",
            lambda opt, m: lookahead_dist.SlowMo(opt, m, tau=2, base=os.path.join(topologies, "ring.yaml")),
        ),
    ]
    for i, (name, build) in enumerate(builders):
        torch.manual_seed(i)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        opt = build(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model)
        train(opt, model, args.steps, seed=100 * rank + i)
        if rank == 0:
            print(f"{name}: {args.steps} steps", flush=True)
    dist.destroy_process_group()
    if rank == 0:
        print("done", flush=True)


if __name__ == "__main__":
    sys.exit(main())
