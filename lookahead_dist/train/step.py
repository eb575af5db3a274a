"""One training step, shared by the trainer and the paper experiments.

The step of a classifier under any wrapper of the library: the scheduled
learning rate on the base optimizer, the gradient of the cross-entropy of one
batch, an optional check between the backward pass and the update, and the
wrapper's step (which mixes, syncs or averages as its algorithm says).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = ["set_lr", "train_step"]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group of ``optimizer`` gets learning rate ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_step(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    opt,
    batch,
    lr: float,
    *,
    poison: bool = False,
    check: Optional[Callable[[float], None]] = None,
) -> float:
    """One optimizer step; returns the batch's loss.

    ``optimizer``: the base optimizer (its learning rate is set to ``lr``, its
    gradients are cleared); ``opt``: what steps (the base optimizer itself, or a
    wrapper around it); ``net``: the module to call (the model, or a
    DistributedDataParallel around it). ``batch``: (inputs, labels), or None on
    a rank that takes no data (it only joins the wrapper's communication; the
    loss is 0.0). ``check(loss)`` runs after the backward pass and before the
    update (the trainer stops every rank there on a non-finite loss);
    ``poison`` multiplies the loss by NaN (a testing aid).
    """
    set_lr(optimizer, lr)
    loss_val = 0.0
    if batch is not None:
        x, y = batch
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)
        if poison:
            loss = loss * float("nan")
        loss.backward()
        loss_val = float(loss.detach())
    if check is not None:
        check(loss_val)
    opt.step()
    return loss_val
