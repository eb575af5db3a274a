"""Outer optimizers and streaming fragments for SlowMo's slow step (DiLoCo, Streaming DiLoCo).

**Outer optimizer.** SlowMo's slow step is an optimizer on the slow copy z whose
gradient is the pseudo-gradient Delta = z - x_bar (x_bar: the exact average of
the workers)::

    z.grad <- z - x_bar;  outer.step();  every worker <- z

SlowMo's own rule, u <- beta u + Delta / gamma, z <- z - alpha gamma u, is
``SGD(lr=alpha, momentum=beta)`` on Delta while the inner learning rate gamma
is constant (write v = gamma u: v <- beta v + Delta, z <- z - alpha v). When
gamma changes between windows the two differ by the factor gamma_{t-1} /
gamma_t on the remembered momentum; ``SGD(lr=alpha * gamma_t, momentum=beta)``
on Delta / gamma_t is the rule exactly for any schedule, which is what
``scale_by_gamma=True`` runs (:func:`outer_step`). DiLoCo (Douillard et al.,
2023) is ``SGD(lr=0.7, momentum=0.9, nesterov=True)`` over AdamW inner steps.

**Fragments** (Streaming DiLoCo, Douillard et al., 2025). The model's parameter
tensors, in registration order, are cut into F runs of nearly equal bytes
(:func:`split_fragments`); fragment f syncs at the end of the steps k with
(k + 1 - floor(f tau / F)) mod tau = 0 (:func:`fragment_offsets`,
:func:`fragment_due`), so each sync moves 1/F of the model and F = 1 is the
plain slow step.

**Which optimizers.** The outer optimizer steps only the parameters whose
gradient is set (a fragment's), and, sharded, sees flat slices of z instead of
the model's tensors. Both are the same computation only for element-wise
optimizers: each element of the update depends on that element's gradient and
state and on per-tensor scalars that advance together (step counts), and a
parameter without a gradient is skipped whole. :data:`ELEMENTWISE` lists those
of torch.optim. ASGD is element-wise too but left out (what it returns is its
averaged copy ``ax``, not the parameter it steps), and so are Adafactor and Muon
(factored or orthogonalised over a matrix: the shape matters).
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch

from lookahead_dist.errors import ConfigError
from lookahead_dist.validation import short_repr

__all__ = [
    "ELEMENTWISE",
    "build_outer",
    "fragment_offsets",
    "fragment_due",
    "outer_step",
    "split_fragments",
]

#: torch.optim optimizers whose update is element-wise (see the module docstring): the ones accepted
#: when the outer optimizer is sharded or fragmented.
ELEMENTWISE = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adagrad,
    torch.optim.RMSprop,
    torch.optim.Adadelta,
    torch.optim.Rprop,
)


def _needs_closure(opt: torch.optim.Optimizer) -> bool:
    if isinstance(opt, torch.optim.LBFGS):
        return True
    try:
        param = inspect.signature(type(opt).step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is inspect.Parameter.empty


def build_outer(
    factory: Callable, params: list[torch.Tensor], *, where: str, elementwise_only: str = ""
) -> torch.optim.Optimizer:
    """``factory(params)``, checked: a torch.optim.Optimizer over exactly ``params`` that can step here.

    ``elementwise_only``: why only :data:`ELEMENTWISE` optimizers are accepted ("" when any is).
    """
    if not callable(factory):
        raise ConfigError(f"{where}: outer must be a callable params -> torch.optim.Optimizer, got {factory!r}")
    try:
        opt = factory(params)
    except (ValueError, TypeError, RuntimeError) as exc:
        shapes = [tuple(p.shape) for p in params]
        hint = f"; {elementwise_only}: use an element-wise optimizer" if elementwise_only else ""
        raise ConfigError(
            f"{where}: the outer factory failed on the slow copy's tensors (shapes {short_repr(shapes)}): "
            f"{type(exc).__name__}: {exc}{hint}"
        ) from exc
    name = type(opt).__name__
    if not isinstance(opt, torch.optim.Optimizer):
        raise ConfigError(f"{where}: outer must return a torch.optim.Optimizer, got {name}")
    if _needs_closure(opt):
        raise ConfigError(
            f"{where}: outer optimizer {name} needs a closure that re-evaluates the loss; the slow step has "
            "only the pseudo-gradient z - x_bar, no loss to re-evaluate"
        )
    if isinstance(opt, torch.optim.SparseAdam):
        raise ConfigError(f"{where}: outer optimizer {name} takes sparse gradients; the pseudo-gradient is dense")
    if elementwise_only and not isinstance(opt, ELEMENTWISE):
        allowed = ", ".join(c.__name__ for c in ELEMENTWISE)
        raise ConfigError(
            f"{where}: outer optimizer {name} is not element-wise, and {elementwise_only}; use one of {allowed}"
        )
    given = {id(p) for p in params}
    held = [p for g in opt.param_groups for p in g["params"]]
    if {id(p) for p in held} != given or len(held) != len(params):
        raise ConfigError(
            f"{where}: outer must build its optimizer over exactly the {len(params)} slow-copy tensors it is "
            f"given (its param groups hold {len(held)} tensors, {len({id(p) for p in held} & given)} of them given)"
        )
    return opt


@torch.no_grad()
def outer_step(
    opt: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    *,
    gamma: float | None = None,
) -> None:
    """One outer step: ``params[i].grad <- grads[i]`` (only these), ``opt.step()``, gradients cleared.

    ``gamma`` (``scale_by_gamma``): the gradients are divided by gamma in place and every group's
    learning rate is multiplied by gamma for this step (then restored exactly), which makes
    ``SGD(lr=alpha, momentum=beta)`` SlowMo's rule for any inner schedule. ``grads`` are scratch.
    """
    if gamma is not None:
        if not gamma > 0.0:
            raise ConfigError(f"SlowMo: scale_by_gamma needs a positive inner learning rate, got {gamma!r}")
        torch._foreach_mul_(list(grads), 1.0 / gamma)
    for p, g in zip(params, grads):
        p.grad = g
    saved = [g["lr"] for g in opt.param_groups]
    try:
        if gamma is not None:
            for g in opt.param_groups:
                g["lr"] = g["lr"] * gamma
        opt.step()
    finally:
        for g, lr in zip(opt.param_groups, saved):
            g["lr"] = lr
        for p in params:
            p.grad = None


def split_fragments(nbytes: Sequence[int], fragments: int, *, where: str = "fragments") -> list[int]:
    """Cut tensors of sizes ``nbytes`` (in order) into ``fragments`` runs of nearly equal bytes.

    Returns the F + 1 tensor indices 0 = b_0 < b_1 < ... < b_F = len(nbytes); fragment f is
    tensors b_f .. b_{f+1} - 1. Each inner boundary is the tensor boundary nearest to f/F of the
    total bytes (the lower one on a tie), keeping every fragment non-empty.
    """
    count = len(nbytes)
    if fragments > count:
        raise ConfigError(f"{where}: {fragments} fragments need at least {fragments} tensors, the model has {count}")
    cum = [0]
    for b in nbytes:
        cum.append(cum[-1] + int(b))
    total = cum[-1]
    bounds = [0]
    for f in range(1, fragments):
        target = f * total / fragments
        lo, hi = bounds[-1] + 1, count - (fragments - f)
        best = min(range(lo, hi + 1), key=lambda j: (abs(cum[j] - target), j))
        bounds.append(best)
    bounds.append(count)
    return bounds


def fragment_offsets(tau: int, fragments: int) -> list[int]:
    """o_f = floor(f tau / F): fragment f syncs at the end of step k when (k + 1 - o_f) mod tau = 0."""
    return [f * tau // fragments for f in range(fragments)]


def fragment_due(step_end: int, tau: int, offsets: Sequence[int]) -> int | None:
    """The fragment that syncs when ``step_end`` = k + 1 steps have ended (at most one when F <= tau), or None."""
    for f, o in enumerate(offsets):
        if (step_end - o) % tau == 0:
            return f
    return None
