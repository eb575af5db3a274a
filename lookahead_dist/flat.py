"""Flat parameter storage: a module's tensors re-homed into one contiguous buffer per dtype and device.

After :func:`flatten_module`, every parameter of the module is a view into one
flat buffer (one per (dtype, device) group), so a mixing step can send, receive
and combine the whole model as a single tensor: no per-tensor messages and no
pack/unpack copies. Optimizers built on ``module.parameters()`` afterwards (or
before: the Parameter objects are kept, only their storage moves) keep working.

A push-sum agent carries its weight w as one trailing element of its first
buffer (``flatten_module(..., weight_slot=True)``), so the weight travels and
mixes with the parameters; :func:`without_weight` gives the views without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

__all__ = ["FlatGroup", "FlatState", "flatten_tensors", "flatten_module", "without_weight"]


def without_weight(buffers: list[torch.Tensor], push_sum: bool) -> list[torch.Tensor]:
    """An agent's flat buffers as views without the push-sum weight (the trailing element of the first)."""
    return [buffers[0][:-1]] + list(buffers[1:]) if push_sum else list(buffers)


@dataclass
class FlatGroup:
    """One contiguous buffer and the tensors that are views into it."""

    buffer: torch.Tensor
    tensors: list[torch.Tensor] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    @property
    def dtype(self) -> torch.dtype:
        return self.buffer.dtype

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


@dataclass
class FlatState:
    """The flat groups of one agent: parameters and (floating) module buffers, each grouped by dtype/device."""

    params: list[FlatGroup]
    buffers: list[FlatGroup]
    weight_slot: bool = False

    def values(self) -> list[torch.Tensor]:
        """The flat buffers as views without the push-sum weight slot (the model's values)."""
        return without_weight(self.tensors(), self.weight_slot)

    def groups(self, include_buffers: bool = True) -> list[FlatGroup]:
        return self.params + (self.buffers if include_buffers else [])

    def tensors(self, include_buffers: bool = True) -> list[torch.Tensor]:
        return [g.buffer for g in self.groups(include_buffers)]

    def check_views(self, what: str = "model", full: bool = True) -> None:
        """Raise if a tensor no longer views its flat buffer (the model was moved or its data replaced).

        ``full=False`` checks only the first tensor of each group (moving a module moves them all).
        """
        from lookahead_dist.errors import ConfigError

        for g in self.groups():
            base = g.buffer.data_ptr()
            end = base + g.buffer.numel() * g.buffer.element_size()
            for name, t in list(zip(g.names, g.tensors))[: None if full else 1]:
                if not (base <= t.data_ptr() < end) or t.device != g.buffer.device:
                    raise ConfigError(
                        f"{what}: tensor {name!r} no longer lives in the flat {g.dtype} buffer on {g.device} "
                        f"(now {t.dtype} on {t.device}); move the model to its device and dtype before "
                        "building the optimizer wrapper, not after"
                    )

    def clone(self) -> list[torch.Tensor]:
        """Copies of the flat buffers (e.g. a slow agent's state), in the same order."""
        return [g.buffer.detach().clone() for g in self.groups()]


def flatten_tensors(named: Iterable[tuple[str, torch.Tensor]], extra: int = 0) -> list[FlatGroup]:
    """Move each tensor's data into a fresh flat buffer of its (dtype, device) group.

    The tensor objects are kept (Parameters stay Parameters, so optimizers that
    already hold them keep working) and their ``.data`` becomes a view of the
    buffer. Returns the groups in first-seen order; each group's tensor order
    is the module's registration order, which is the same on every rank.
    ``extra`` trailing elements (zero) are appended to the first group's buffer:
    room for a push-sum weight that then travels and mixes with the parameters.
    """
    order: list[tuple[torch.dtype, torch.device]] = []
    members: dict[tuple[torch.dtype, torch.device], list[tuple[str, torch.Tensor]]] = {}
    seen: set[int] = set()
    for name, t in named:
        if id(t) in seen:  # tied weights: flatten once
            continue
        seen.add(id(t))
        key = (t.dtype, t.device)
        if key not in members:
            order.append(key)
            members[key] = []
        members[key].append((name, t))
    groups = []
    for gi, key in enumerate(order):
        items = members[key]
        total = sum(t.numel() for _, t in items)
        buf = torch.zeros(total + (extra if gi == 0 else 0), dtype=key[0], device=key[1])
        offset = 0
        for _, t in items:
            n = t.numel()
            buf[offset : offset + n].copy_(t.detach().reshape(-1))
            with torch.no_grad():
                t.data = buf[offset : offset + n].view_as(t)
            offset += n
        groups.append(FlatGroup(buf, [t for _, t in items], [nm for nm, _ in items]))
    return groups


def flatten_module(module: torch.nn.Module, *, buffers: bool = True, weight_slot: bool = False) -> FlatState:
    """Re-home ``module``'s parameters (and floating-point buffers) into flat buffers.

    ``buffers=False`` leaves the module's buffers where they are (kept local,
    not mixed). Integer buffers (BatchNorm's ``num_batches_tracked``) are always
    left alone: they are counters, not something to average. ``weight_slot``
    appends one element, set to 1 (every push-sum weight starts at 1), to the
    first parameter buffer.
    """
    params = flatten_tensors(module.named_parameters(), extra=1 if weight_slot else 0)
    bufs = (
        flatten_tensors((name, b) for name, b in module.named_buffers() if b is not None and b.is_floating_point())
        if buffers
        else []
    )
    if weight_slot:
        params[0].buffer[-1] = 1.0
    return FlatState(params, bufs, weight_slot)
