"""Deterministic objectives for the reference engine (:mod:`lookahead_dist.reference.simulate`), tests and benchmarks.

An *objective* serves n agents. Agent i's stochastic loss at step k is evaluated by

    loss_and_grad(agent, step, x) -> (loss: 0-dim tensor, grad: (d,) tensor)

and, optionally, for several agents at once (the vectorized engine path) by

    batched_grad(step, X, agents) -> (loss: (m,) tensor, grad: (m, d) tensor)

where row r of X is the model of agent ``agents[r]``. Neither method may modify
its input in place (the engine may pass its own storage).

**Reproducible streams.** Every random draw (gradient noise, a minibatch, a data
shard, an initialisation) comes from its own CPU ``torch.Generator`` seeded by
:func:`stream_seed` from ``(seed, tag, agent, step)`` only, never from a shared
generator. Agent i's draw at step k is therefore the same whatever else was
computed before it, in any process: a distributed worker that holds agent i
reproduces it with ``rng(seed, tag, i, k)`` (see each class for its tags),
and moves the result to its device afterwards.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lookahead_dist.errors import ConfigError
from lookahead_dist.validation import check_int

__all__ = [
    "stream_seed",
    "rng",
    "Quadratic",
    "ModuleProblem",
    "flatten_params",
    "unflatten",
    "tiny_regression",
]


def stream_seed(seed: int, tag: str, *keys: int) -> int:
    """A 63-bit seed that depends only on ``(seed, tag, *keys)``.

    It is the first 8 bytes (little endian) of BLAKE2b over the text
    ``"{seed}/{tag}/{key0}/{key1}/..."``, with the top bit cleared; it is the same
    in every process, Python version and platform.

    >>> stream_seed(0, "noise", 3, 7) == stream_seed(0, "noise", 3, 7) != stream_seed(0, "noise", 7, 3)
    True
    """
    text = "/".join([str(int(seed)), str(tag)] + [str(int(k)) for k in keys])
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def rng(seed: int, tag: str, *keys: int) -> torch.Generator:
    """A fresh CPU random-number generator seeded with :func:`stream_seed` ``(seed, tag, *keys)``."""
    g = torch.Generator(device="cpu")
    g.manual_seed(stream_seed(seed, tag, *keys))
    return g


def generator(seed: int, tag: str, *keys: int) -> torch.Generator:
    """Deprecated name of :func:`rng` (a random-number generator, not a topology generator)."""
    warnings.warn(
        "lookahead_dist.reference.problems.generator is deprecated; call rng", DeprecationWarning, stacklevel=2
    )
    return rng(seed, tag, *keys)


def _check_positive_int(name: str, value) -> int:
    return check_int(value, name)


class Quadratic:
    """f_i(x) = 1/2 (x - b_i)^T diag(h) (x - b_i), for agents i = 0..n-1, with optional gradient noise.

    The stochastic gradient of agent i at step k is h * (x - b_i) + noise * xi_{i,k}
    with xi_{i,k} ~ N(0, I_d) drawn from ``rng(seed, "noise", i, k)``; the
    reported loss is the exact f_i(x). The curvatures h are uniform in
    ``curvature`` (drawn from ``rng(seed, "h")``), the centres b_i are
    standard normal (``rng(seed, "b", i)``), and the average objective
    f = (1/n) sum_i f_i is minimised by mean_i b_i.

    >>> q = Quadratic(d=3, n=2, seed=0)
    >>> loss, g = q.loss_and_grad(0, 0, q.b[0])
    >>> float(loss), g.abs().max().item()
    (0.0, 0.0)
    """

    def __init__(
        self,
        d: int,
        n: int,
        seed: int = 0,
        noise: float = 0.0,
        curvature: Tuple[float, float] = (0.5, 2.0),
        dtype: torch.dtype = torch.float64,
    ):
        self.d = _check_positive_int("d", d)
        self.n = _check_positive_int("n", n)
        if not noise >= 0.0:
            raise ConfigError(f"noise: must be >= 0, got {noise!r}")
        lo, hi = (float(c) for c in curvature)
        if not 0.0 <= lo <= hi:
            raise ConfigError(f"curvature: must be a range (lo, hi) with 0 <= lo <= hi, got {curvature!r}")
        self.seed, self.noise, self.dtype = int(seed), float(noise), dtype
        u = torch.rand(self.d, generator=rng(self.seed, "h"), dtype=torch.float64)
        self.h = (lo + (hi - lo) * u).to(dtype)
        self.b = torch.stack(
            [torch.randn(self.d, generator=rng(self.seed, "b", i), dtype=torch.float64) for i in range(self.n)]
        ).to(dtype)

    def noise_sample(self, agent: int, step: int) -> Tensor:
        """xi_{agent,step}: the standard normal draw scaled by ``noise`` in that agent's gradient."""
        g = rng(self.seed, "noise", agent, step)
        return torch.randn(self.d, generator=g, dtype=torch.float64).to(self.dtype)

    def loss_and_grad(self, agent: int, step: int, x: Tensor) -> Tuple[Tensor, Tensor]:
        r = x - self.b[agent]
        loss = 0.5 * torch.dot(self.h * r, r)
        grad = self.h * r
        if self.noise > 0.0:
            grad = grad + self.noise * self.noise_sample(agent, step)
        return loss, grad

    def batched_grad(self, step: int, X: Tensor, agents: Sequence[int]) -> Tuple[Tensor, Tensor]:
        agents = [int(i) for i in agents]
        R = X - (self.b if agents == list(range(self.n)) else self.b[agents])
        G = self.h * R
        loss = 0.5 * R.mul_(G).sum(dim=1)
        if self.noise > 0.0:
            G = G + self.noise * torch.stack([self.noise_sample(i, step) for i in agents])
        return loss, G

    def loss(self, x: Tensor) -> Tensor:
        """The average objective f(x) = (1/n) sum_i f_i(x)."""
        R = x - self.b
        return 0.5 * ((R * R) * self.h).sum(dim=1).mean()

    def minimizer(self) -> Tensor:
        return self.b.mean(dim=0)

    def initial(self) -> Tensor:
        """A standard normal starting point from ``rng(seed, "x0")``."""
        return torch.randn(self.d, generator=rng(self.seed, "x0"), dtype=torch.float64).to(self.dtype)


def flatten_params(module: nn.Module) -> Tensor:
    """All parameters of ``module`` in ``named_parameters()`` order, concatenated into one detached vector."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def unflatten(x_flat: Tensor, module: nn.Module) -> dict:
    """Split a flat vector into ``{name: view}`` with the shapes of ``module``'s parameters.

    The views share storage (and autograd history) with ``x_flat``; the inverse of
    :func:`flatten_params`.
    """
    out, offset = {}, 0
    for name, p in module.named_parameters():
        out[name] = x_flat[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
    if offset != x_flat.numel():
        raise ConfigError(f"x_flat: has {x_flat.numel()} entries but the module has {offset} parameters")
    return out


class ModuleProblem:
    """A torch module trained on per-agent minibatches, seen as a function of one flat parameter vector.

    f_i(x; step) = loss_fn(module_x(inputs), targets) with ``(inputs, targets) =
    data_fn(agent, step)`` and module_x the module with its parameters replaced by
    ``unflatten(x, module)`` (through ``torch.func.functional_call``; the module's
    own tensors are never changed). ``data_fn`` must be deterministic in
    ``(agent, step)``; the same module and data_fn reproduce the same gradients in
    any process.
    """

    def __init__(
        self,
        module: nn.Module,
        data_fn: Callable[[int, int], Tuple[Tensor, Tensor]],
        loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.mse_loss,
        n: Optional[int] = None,
    ):
        if not isinstance(module, nn.Module):
            raise ConfigError(f"module: must be a torch.nn.Module, got {type(module).__name__}")
        self.module, self.data_fn, self.loss_fn, self.n = module, data_fn, loss_fn, n
        self.x0 = flatten_params(module)
        self.d = self.x0.numel()

    def loss_and_grad(self, agent: int, step: int, x: Tensor) -> Tuple[Tensor, Tensor]:
        inputs, targets = self.data_fn(agent, step)
        with torch.enable_grad():
            xv = x.detach().clone().requires_grad_(True)
            out = functional_call(self.module, unflatten(xv, self.module), (inputs,))
            loss = self.loss_fn(out, targets)
            (grad,) = torch.autograd.grad(loss, xv)
        return loss.detach(), grad

    def batched_grad(self, step: int, X: Tensor, agents: Sequence[int]) -> Tuple[Tensor, Tensor]:
        pairs = [self.loss_and_grad(int(i), step, X[r]) for r, i in enumerate(agents)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def loss(self, x: Tensor, agents: Sequence[int], step: int = 0) -> Tensor:
        """Mean over ``agents`` of their loss at ``x`` on their minibatch of ``step``."""
        return torch.stack([self.loss_and_grad(int(i), step, x)[0] for i in agents]).mean()


def tiny_regression(
    n_agents: int,
    seed: int = 0,
    *,
    d_in: int = 8,
    hidden: int = 32,
    shard: int = 64,
    batch: int = 16,
    heterogeneity: float = 0.5,
) -> ModuleProblem:
    """A float64 two-layer tanh MLP (d_in -> hidden -> 1) regressing a fixed teacher; d = 321 by default.

    Streams (all from :func:`rng`):

    - ``("init",)``: the module's initial weights, so ``problem.x0`` is fixed by ``seed``;
    - ``("teacher",)``: the teacher y = sin(x . w1) + 0.5 x . w2;
    - ``("shard", i)``: agent i's ``shard`` inputs, N(0, I) shifted by ``heterogeneity``
      times a standard normal vector of its own, and its label noise (std 0.1);
    - ``("batch", i, k)``: the ``batch`` indices into agent i's shard used at step k.
    """
    n_agents = _check_positive_int("n_agents", n_agents)
    module = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, 1)).double()
    g = rng(seed, "init")
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else hidden
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / fan_in**0.5)
    gt = rng(seed, "teacher")
    w1 = torch.randn(d_in, generator=gt, dtype=torch.float64) / d_in**0.5
    w2 = torch.randn(d_in, generator=gt, dtype=torch.float64) / d_in**0.5
    shards: dict = {}

    def shard_of(agent: int) -> Tuple[Tensor, Tensor]:
        if agent not in shards:
            gs = rng(seed, "shard", agent)
            shift = heterogeneity * torch.randn(d_in, generator=gs, dtype=torch.float64)
            inputs = torch.randn(shard, d_in, generator=gs, dtype=torch.float64) + shift
            noise = 0.1 * torch.randn(shard, generator=gs, dtype=torch.float64)
            targets = torch.sin(inputs @ w1) + 0.5 * (inputs @ w2) + noise
            shards[agent] = (inputs, targets.unsqueeze(1))
        return shards[agent]

    def data_fn(agent: int, step: int) -> Tuple[Tensor, Tensor]:
        if not 0 <= agent < n_agents:
            raise ConfigError(f"agent: must lie in [0, {n_agents}), got {agent!r}")
        inputs, targets = shard_of(int(agent))
        idx = torch.randint(shard, (batch,), generator=rng(seed, "batch", agent, step))
        return inputs[idx], targets[idx]

    return ModuleProblem(module, data_fn, nn.functional.mse_loss, n=n_agents)
