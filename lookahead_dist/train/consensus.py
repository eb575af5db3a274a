"""The consensus model: the exact average of the workers' models, for evaluation.

Every rank contributes its model with its weight in the average (push-sum:
its weight, so that the average is sum of numerators / sum of weights; 0 on a
rank with no fast agent; else 1). The average is all-reduced into a separate
evaluation model, so that training is not disturbed.
"""

from __future__ import annotations

import math

import torch

from lookahead_dist.comm import Comm
from lookahead_dist.decentralized import Decentralized
from lookahead_dist.engine import exact_average_
from lookahead_dist.slowmo import SlowMo
from lookahead_dist.train.config import Config
from lookahead_dist.train.models import build_model

__all__ = ["Consensus", "push_sum_weight", "state_tensors"]


def push_sum_weight(opt) -> float:
    """This rank's weight in the consensus average: push-sum weight, 0 on a rank with no fast agent, else 1."""
    inner = opt.base if isinstance(opt, SlowMo) and opt.base is not None else opt
    if isinstance(inner, Decentralized):
        return inner.weight if inner.fast_agent is not None else 0.0
    return 1.0


def state_tensors(model) -> list[torch.Tensor]:
    """What the consensus averages: the parameters, then the floating buffers (BatchNorm statistics)."""
    return list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]


class Consensus:
    """The exact average of the workers' models, computed into a separate evaluation model."""

    def __init__(self, cfg: Config, model, comm: Comm, device):
        self.comm, self.model = comm, model
        self.eval_model = build_model(cfg.model, small_inputs=cfg.data.name == "cifar10").to(device)
        self.eval_model.load_state_dict(model.state_dict())
        self.ranks = list(range(comm.world_size))

    @torch.no_grad()
    def update(self, weight: float) -> float:
        """Load the average into the evaluation model; return the consensus distance of the parameters,
        sqrt(sum_i c_i ||x_i - x_bar||^2 / sum_i c_i) (c_i = 1 for a worker, 0 for a passive rank).

        ``weight``: this rank's weight in the average (push-sum weight; 0 on a passive rank).
        Floating buffers (BatchNorm statistics) are averaged too, but left out of the distance.
        """
        mine = torch.cat([t.detach().reshape(-1) for t in state_tensors(self.model)]).double()
        nparams = sum(p.numel() for p in self.model.parameters())
        dev = self.comm.device_for_collectives()
        # [values, weight slot]: one all-reduce carries the numerators and the sum of the weights
        total = torch.cat([mine, mine.new_tensor([weight])]).to(dev)
        exact_average_([total], weight, self.comm, self.ranks, weight_slot=True)
        avg = total[:-1].to(mine.device)
        active = 1.0 if weight > 0 else 0.0
        gap = float((mine[:nparams] - avg[:nparams]).pow(2).sum())
        dist2 = torch.tensor([active * gap, active], dtype=torch.float64, device=dev)
        self.comm.all_reduce_sum(dist2, self.ranks)
        offset = 0
        for t in state_tensors(self.eval_model):
            t.copy_(avg[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        for (_, dst), (_, src) in zip(self.eval_model.named_buffers(), self.model.named_buffers()):
            if not dst.is_floating_point():
                dst.copy_(src)
        return math.sqrt(float(dist2[0]) / max(float(dist2[1]), 1.0))

    @torch.no_grad()
    def accuracy(self, data) -> float:
        """Test accuracy of the evaluation model; every rank scores its slice of the test set."""
        self.eval_model.eval()
        hits, count = 0, 0
        for x, y in data.test():
            hits += int((self.eval_model(x).argmax(1) == y).sum())
            count += len(y)
        t = torch.tensor([hits, count], dtype=torch.float64, device=self.comm.device_for_collectives())
        self.comm.all_reduce_sum(t, self.ranks)
        return float(t[0] / t[1])
