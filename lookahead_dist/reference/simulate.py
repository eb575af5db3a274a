"""Single-process float64 reference engine: X_{k+1} = (X_k - G_k) P_k (paper eq. 4), or X_k P_k - G_k.

Length: about 640 lines, kept whole on purpose: this is the oracle every distributed run is checked
against, and its stages of a step, in both orders and with the overlapped slow step, read top to
bottom in one file, beside the argument checks.

Every distributed algorithm of the library is checked against this module, so it
is written to be plain rather than fast (a vectorized path exists for scale and
is itself checked against the plain per-agent path).

**Storage.** Agents are the columns of X_k; here they are stored as the *rows*
of an (n, d) tensor Xr = X^T, so the step reads

    Xr_{k+1} = P_k^T (Xr_k - Gr_k),

with Gr = G^T holding each agent's base-optimizer update as a row. With a
push-sum (row-stochastic) schedule each agent also carries a weight w (w_0 = 1),
mixed the same way, w_{k+1} = P_k^T w_k, and its model is the de-biased
z_i = x_i / w_i.

**One step k** (``order="adapt_then_combine"``, the default: adapt, then combine)

1. every fast agent i evaluates its stochastic gradient at its model (z_i for
   push-sum, x_i otherwise) on its own data/noise of step k;
2. ``grad_mixing="average"``: the fast agents' gradients are replaced by their
   exact mean (all-reduce SGD);
3. base step: each fast agent's torch optimizer steps its own parameter (the
   numerator x_i for push-sum); row i of Gr_k is x_i before minus x_i after.
   Slow agents are never stepped;
4. mixing: Xr <- P_k^T Xr (and w <- P_k^T w);
5. slow momentum (SlowMo), when ``(k + 1) % tau == 0``: with x_bar the exact
   average of the fast agents (push-sum: sum of numerators / sum of weights) and
   gamma the first fast optimizer's ``lr`` at the window's first step,
   u <- beta u + (z - x_bar) / gamma;  z <- z - alpha gamma u; then every agent
   (slow and fast) <- z and the push-sum weights <- 1;
6. at a *slow step* (slow momentum ran, or P_k has an edge between a slow and a
   fast agent) the base optimizers' state follows ``optimizer_state``: ``"keep"``,
   ``"reset"`` (state cleared, the optimizers restart) or ``"average"`` (every
   floating state tensor shaped like the parameter is replaced by its mean over
   the fast agents; step counters and scalars are kept).

**Combine-then-adapt** (``order="combine_then_adapt"``): X_{k+1} = X_k P_k - G_k,
the order that overlapped communication computes (the exchange of x_k runs while
the gradient at x_k is computed). Stages 1-2 are as above, at the de-biased
model Z_k of the start of the step; then the mixing (stage 4) comes first,
Xr <- P_k^T Xr and w <- P_k^T w, and the base step (stage 3) second: each fast
agent's optimizer steps its *mixed* row with the gradient taken at Z_k, so weight
decay and every other term that reads the parameter see the combined point. For
push-sum the update is subtracted from the combined numerator and the model is
de-biased afterwards (x / w with the mixed w). Row i of Gr_k is the mixed x_i
before the base step minus x_i after it. Stages 5-6 follow at the end of the
step, unchanged. With identity mixing both orders are the same computation.

In either order, if every P_k has the invariant vector a (P_k a = a), y_k = X_k a
obeys y_{k+1} = y_k - G_k a (paper eq. 8); :class:`Trace` records y_k.

**Overlapped slow step** (``overlap_slow=True``, with ``slow_momentum``): the
slow step's all-reduce runs while one more base step is taken, and its result is
applied with a delay correction. At the end of step k, in either order:

- if a sync is pending (started at the end of step k - 1), it is applied: x_bar
  is the exact average of the fast agents in the copy sent (push-sum: sum of
  the sent numerators / sum of the sent weights), u <- beta u + (z - x_bar) /
  gamma_p, z <- z - alpha gamma_p u, with gamma_p the ``lr`` saved with the
  sync (that of the window which ended when it started; step k already began
  a new window); then every agent's de-biased model z_i <- z + (z_i now - z_i
  sent), the numerators <- those models and the push-sum weights <- 1; then
  stage 6 as at a slow step;
- then, if ``(k + 1) % tau == 0``, a sync starts instead of stage 5: a copy of
  the numerators, the weights and gamma is kept (:attr:`Reference.pending_slow`);
  the agents keep their values.

The first slow step therefore takes effect at the end of step tau, one step
late; with tau = 1 each step end applies one sync and starts the next.
This is Streaming DiLoCo's overlapped outer sync (Douillard et al. 2025,
"Streaming DiLoCo with overlapping communication") with a delay of exactly
one base step: there the outer gradient is sent, inner steps go on for
tau_overlap steps, and the received outer update is merged as a mix of the
local and the global parameters; here the merge keeps the full local progress
made during the sync, x <- z_new + (x_now - x_sent), i.e. their merge with
weight 1 on the local delta.

Example (Lookahead with SGD on a quadratic)::

    >>> import torch
    >>> from lookahead_dist.mixing import lookahead_schedule
    >>> from lookahead_dist.reference.problems import Quadratic
    >>> q = Quadratic(d=4, n=2, seed=0)
    >>> tr = simulate(lookahead_schedule(0.5, 5), ["fast", "slow"], torch.zeros(4), q,
    ...               lambda p: torch.optim.SGD(p, lr=0.1), steps=10)
    >>> torch.equal(tr.X[10][0], tr.X[10][1])   # x = z every tau steps (eqs. 9-10)
    True
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from lookahead_dist.errors import ConfigError, MixingError
from lookahead_dist.mixing import Schedule
from lookahead_dist.outer import build_outer, fragment_due, fragment_offsets, outer_step, split_fragments
from lookahead_dist.validation import (
    OPTIMIZER_STATE_POLICIES,
    check_beta,
    check_fragments,
    check_int,
    check_optimizer_state,
    check_slow_alpha,
    check_tau,
)

__all__ = ["SlowMomentum", "PendingSlow", "Trace", "Reference", "simulate", "ROLES", "BUFFERS", "GRAD_MIXING", "ORDERS"]

ROLES = ("fast", "slow")
BUFFERS = OPTIMIZER_STATE_POLICIES  # the former name of the optimizer-state policies
GRAD_MIXING = (None, "average")
ORDERS = ("adapt_then_combine", "combine_then_adapt")
SPARSE_DENSITY = 0.1  # phases with fewer non-zeros than this fraction of n^2 mix with a sparse matmul
_ELEMENTWISE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


@dataclass
class SlowMomentum:
    """SlowMo's outer rule: every ``tau`` steps, u <- beta u + (z - x_bar)/gamma; z <- z - alpha gamma u.

    With beta = 0 it is the matrix step z, fast agents <- (1 - alpha) z + alpha x_bar.
    alpha (None: 1.0) lies in (0, max_alpha], as :class:`~lookahead_dist.slowmo.SlowMo`'s does;
    beta is None: 0.5.

    ``outer``: a factory ``params -> torch.optim.Optimizer`` that replaces the rule (alpha and beta
    stay None): at a slow step each parameter gets the gradient z - x_bar and the optimizer steps
    (``scale_by_gamma``: on (z - x_bar) / gamma with the lr times gamma, as in SlowMo). The
    parameters are views of z: one per shape of ``param_shapes`` (the model's parameter shapes,
    in registration order, numels summing to d), so that even shape-dependent optimizers see
    what the distributed :class:`~lookahead_dist.slowmo.SlowMo` gives them; without
    ``param_shapes``, one 1-D view per fragment ([z] itself when fragments = 1), which equals
    SlowMo's per-parameter split only for element-wise optimizers.

    ``fragments`` (1 <= F <= tau): fragment f, a run of ``param_shapes`` of nearly equal size
    (without them: elements f d / F .. (f + 1) d / F), syncs at the end of the steps k with
    (k + 1 - floor(f tau / F)) mod tau = 0; see :mod:`lookahead_dist.outer`.
    """

    alpha: Optional[float] = None
    beta: Optional[float] = None
    tau: int = 12
    max_alpha: float = 1.0
    outer: Optional[Callable] = None
    scale_by_gamma: bool = False
    fragments: int = 1
    param_shapes: Optional[Sequence] = None

    def __post_init__(self):
        if self.outer is None:
            self.alpha = 1.0 if self.alpha is None else self.alpha
            self.beta = 0.5 if self.beta is None else self.beta
        self.validate()

    def validate(self) -> None:
        check_tau(self.tau, "slow_momentum.tau")
        if self.outer is not None:
            if self.alpha is not None or self.beta is not None:
                raise ConfigError(
                    "slow_momentum: outer replaces the slow-momentum rule, so alpha and beta must stay None "
                    f"with it (got alpha={self.alpha!r}, beta={self.beta!r})"
                )
            if not callable(self.outer):
                raise ConfigError(f"slow_momentum.outer: must be a callable params -> Optimizer, got {self.outer!r}")
        else:
            check_slow_alpha(self.alpha, "slow_momentum.alpha", max_alpha=self.max_alpha)
            check_beta(self.beta, "slow_momentum.beta")
            if self.scale_by_gamma:
                raise ConfigError("slow_momentum.scale_by_gamma: True scales an outer optimizer, but outer is None")
        check_fragments(self.fragments, self.tau, "slow_momentum.fragments")
        if self.param_shapes is not None:
            for i, shape in enumerate(self.param_shapes):
                if not isinstance(shape, (tuple, list, torch.Size)) or not all(
                    isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
                ):
                    raise ConfigError(f"slow_momentum.param_shapes[{i}]: must be a tuple of ints >= 0, got {shape!r}")


@dataclass
class PendingSlow:
    """An overlapped slow step in flight (see ``overlap_slow``): what was sent at the end of step ``step``.

    ``numerators`` (n, d) and ``weights`` ((n,), or None without push-sum) are the
    agents as sent; ``gamma`` is the fast ``lr`` of the window that ended there; ``fragment``
    the fragment synced (0 without fragments).
    It is applied at the end of step ``step + 1``.
    """

    step: int
    numerators: Tensor
    weights: Optional[Tensor]
    gamma: float
    fragment: int = 0


@dataclass
class Trace:
    """What :meth:`Reference.run` recorded over steps ``start .. start + steps`` (float64 tensors).

    Row s of a per-step record belongs to global step ``start + s``.

    - ``y``: (steps+1, d), y_k = X_k a (for push-sum, the mean of the numerators);
    - ``loss``, ``grad_norm``: (steps, n), each fast agent's loss and the norm of its
      own stochastic gradient (before gradient mixing) at step k; NaN for slow agents;
    - ``consensus``: (steps+1,), ||Z_k - z_bar 1^T||_F over the de-biased agents Z_k,
      z_bar their mean over all agents;
    - ``X``: {k: (n, d) de-biased agents} at the recorded steps (always the last);
    - ``weights``: (steps+1, n) push-sum weights, or None;
    - ``a``: the vector used for y; ``a_invariant`` says whether P_k a = a for all k.
    """

    start: int
    y: Tensor
    loss: Tensor
    grad_norm: Tensor
    consensus: Tensor
    X: Dict[int, Tensor]
    weights: Optional[Tensor]
    a: Tensor
    a_invariant: bool


def _plain(v):
    return v.detach().cpu().tolist() if isinstance(v, Tensor) else v


def _hyper(opt: torch.optim.Optimizer) -> List[dict]:
    return [{k: _plain(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]


class Reference:
    """n agents following a :class:`~lookahead_dist.mixing.Schedule`, fast ones driven by real torch optimizers.

    Arguments: ``schedule`` (n agents), ``roles`` (n strings, ``"fast"`` or ``"slow"``),
    ``x0`` ((d,) shared start, or (n, d) one row per agent), ``objective`` (see
    :mod:`lookahead_dist.reference.problems`), ``optimizer_factory(params) -> Optimizer``
    (called once per fast agent on its own (d,) tensor). Keywords: ``slow_momentum``
    (a :class:`SlowMomentum`), ``optimizer_state`` (``"keep"``, ``"reset"``, ``"average"``; formerly
    ``buffers``, still accepted with a DeprecationWarning),
    ``grad_mixing`` (None or ``"average"``), ``dtype``, ``record_every`` /
    ``record_steps`` (which steps :meth:`run` snapshots), ``invariant`` (the vector a
    for y_k; default the schedule's, or 1/n when it has none), ``vectorized``, ``order``
    (``"adapt_then_combine"``, the default, or ``"combine_then_adapt"``) and ``overlap_slow``
    (apply each slow-momentum step one base step late, with the delay correction; needs
    ``slow_momentum``). The module docstring says what each does.

    ``vectorized`` (``"auto"``, True, False): one optimizer over the whole (n, d)
    tensor (slow rows get zero gradient and are restored after the step) and a
    sparse matmul for sparse phases. It needs ``objective.batched_grad`` and an
    elementwise optimizer (SGD, Adam, AdamW) that the factory builds with the same
    hyper-parameters for every fast agent (the factory is called once per fast
    agent, then once more on the (n, d) tensor, which must get the same ones).
    ``"auto"`` uses it when allowed; True raises :class:`ConfigError` when not.

    The slow-momentum slow model z starts at the initial model: x0 if it is (d,),
    else the slow agents' common row (they must agree), or the fast agents' mean
    when there is no slow agent.
    """

    def __init__(
        self,
        schedule: Schedule,
        roles: Sequence[str],
        x0,
        objective,
        optimizer_factory: Callable[[List[Tensor]], torch.optim.Optimizer],
        *,
        slow_momentum: Optional[SlowMomentum] = None,
        optimizer_state: str = "keep",
        grad_mixing: Optional[str] = None,
        dtype: torch.dtype = torch.float64,
        record_every: Optional[int] = None,
        record_steps: Optional[Iterable[int]] = None,
        invariant=None,
        vectorized="auto",
        buffers: Optional[str] = None,
        order: str = "adapt_then_combine",
        overlap_slow: bool = False,
    ):
        if buffers is not None:
            warnings.warn(
                "Reference(buffers=...) is deprecated: the base optimizer's state policy is now called "
                "optimizer_state=, as in SlowMo",
                DeprecationWarning,
                stacklevel=2,
            )
            if optimizer_state not in ("keep", buffers):
                raise ConfigError(
                    f"optimizer_state={optimizer_state!r} and its deprecated spelling "
                    f"buffers={buffers!r} disagree; pass optimizer_state only"
                )
            optimizer_state = buffers
        if not isinstance(schedule, Schedule):
            raise ConfigError(f"schedule: must be a lookahead_dist.mixing.Schedule, got {type(schedule).__name__}")
        n = schedule.n
        roles = tuple(roles) if not isinstance(roles, str) else (roles,)
        if len(roles) != n:
            raise ConfigError(f"roles: the schedule has {n} agents but roles has {len(roles)} entries: {list(roles)!r}")
        for i, r in enumerate(roles):
            if r not in ROLES:
                raise ConfigError(f"roles[{i}]: must be 'fast' or 'slow', got {r!r}")
        if "fast" not in roles:
            raise ConfigError(f"roles: at least one agent must be 'fast', got {list(roles)!r}")
        check_optimizer_state(optimizer_state)
        if grad_mixing not in GRAD_MIXING:
            raise ConfigError(f"grad_mixing: must be None or 'average', got {grad_mixing!r}")
        if not isinstance(order, str) or order not in ORDERS:
            raise ConfigError(f"order: must be 'adapt_then_combine' or 'combine_then_adapt', got {order!r}")
        if not isinstance(overlap_slow, bool):
            raise ConfigError(f"overlap_slow: must be True or False, got {overlap_slow!r}")
        if overlap_slow and slow_momentum is None:
            raise ConfigError("overlap_slow: True needs slow_momentum (there is no slow step to overlap)")
        if vectorized not in ("auto", True, False):
            raise ConfigError(f"vectorized: must be 'auto', True or False, got {vectorized!r}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ConfigError(f"dtype: must be a floating torch dtype, got {dtype!r}")
        if slow_momentum is not None:
            if not isinstance(slow_momentum, SlowMomentum):
                raise ConfigError(f"slow_momentum: must be a SlowMomentum or None, got {slow_momentum!r}")
            slow_momentum.validate()
            if slow_momentum.fragments > 1 and optimizer_state != "keep":
                raise ConfigError(
                    f"optimizer_state: fragments={slow_momentum.fragments} needs 'keep' (a fragment's sync cannot "
                    f"{optimizer_state} the whole base optimizer's state), got {optimizer_state!r}"
                )
        if record_every is not None:
            check_int(record_every, "record_every")
        steps_set = {check_int(s, "record_steps[i]", low=0) for s in record_steps or ()}
        if not callable(getattr(objective, "loss_and_grad", None)):
            raise ConfigError(f"objective: must have a loss_and_grad(agent, step, x) method, got {objective!r}")
        if not callable(optimizer_factory):
            raise ConfigError(f"optimizer_factory: must be callable, got {optimizer_factory!r}")

        x0 = torch.as_tensor(x0).detach().to(dtype)
        if x0.dim() == 1 and x0.numel() > 0:
            X0 = x0.unsqueeze(0).repeat(n, 1)
        elif x0.dim() == 2 and x0.shape[0] == n and x0.shape[1] > 0:
            X0 = x0.clone()
        else:
            raise ConfigError(f"x0: must have shape (d,) or (n, d) = ({n}, d), got {tuple(x0.shape)}")
        if not bool(torch.isfinite(X0).all()):
            raise ConfigError("x0: contains NaN or inf")

        self.schedule, self.roles, self.n, self.d, self.dtype = schedule, roles, n, X0.shape[1], dtype
        self.objective, self.slow_momentum = objective, slow_momentum
        self.optimizer_state_policy, self.grad_mixing = optimizer_state, grad_mixing
        self.record_every, self.record_steps = record_every, steps_set
        self.order, self.overlap_slow = order, overlap_slow
        self._pending: Optional[PendingSlow] = None
        self.push_sum = schedule.push_sum
        self.fast = [i for i, r in enumerate(roles) if r == "fast"]
        self.slow = [i for i, r in enumerate(roles) if r == "slow"]
        self._k = 0
        self._x = X0  # numerators, one row per agent
        self._w = torch.ones(n, dtype=dtype) if self.push_sum else None
        self._update = torch.zeros_like(X0)
        self._scratch = torch.empty_like(X0)  # reused every step: large allocations cost more than a copy
        self._last_loss = torch.full((n,), math.nan, dtype=torch.float64)
        self._last_gnorm = torch.full((n,), math.nan, dtype=torch.float64)

        if invariant is not None:
            a = np.asarray(invariant, dtype=np.float64)
            if a.shape != (n,):
                raise ConfigError(f"invariant: must have shape ({n},), got {a.shape}")
            self.a_invariant = all(np.allclose(p.matrix @ a, a, rtol=0, atol=1e-12) for p in schedule.phases)
        else:
            try:
                a, self.a_invariant = schedule.invariant_vector(), True
            except MixingError:
                a, self.a_invariant = np.full(n, 1.0 / n), False
        self.a = torch.tensor(a, dtype=dtype)

        if slow_momentum is not None:
            if x0.dim() == 1:
                z0 = x0.clone()
            elif self.slow:
                z0 = X0[self.slow[0]].clone()
                if not bool((X0[self.slow] == z0).all()):
                    raise ConfigError("x0: with slow_momentum every slow agent must start from the same row")
            else:
                z0 = X0[self.fast].mean(dim=0)
            self._z, self._u = z0, torch.zeros_like(z0)
            self._slow_layout(slow_momentum)
        else:
            self._z = self._u = self._outer = None

        self._leaves = [torch.zeros(self.d, dtype=dtype) for _ in self.fast]
        self._opts = [self._make_opt(optimizer_factory, [p]) for p in self._leaves]
        self.vectorized = False
        if vectorized is not False:
            why = self._why_not_vectorized()
            if not why:
                whole = self._make_opt(optimizer_factory, [self._x])
                if type(whole) is not type(self._opts[0]) or _hyper(whole) != _hyper(self._opts[0]):
                    why = "the factory gives the stacked (n, d) tensor other hyper-parameters than the agents"
                else:
                    self._leaves, self._opts, self.vectorized = [self._x], [whole], True
            if why and vectorized is True:
                raise ConfigError(f"vectorized: True is not possible here: {why}")

        roles_arr = np.array([r == "fast" for r in roles])
        self._phases = []
        for ph in schedule.phases:
            # Read from the phase's stored entries, never an n x n array, except for a dense mixer (the per-agent
            # path, or a dense phase): that one is limited to mixing.MAX_DENSE_AGENTS agents.
            rows, cols, vals = ph.entries()
            off = rows != cols
            mixes_roles = bool((roles_arr[rows[off]] != roles_arr[cols[off]]).any())
            if ph.is_identity:
                mixer = None
            elif self.vectorized and vals.size < SPARSE_DENSITY * n * n:
                at, values = torch.from_numpy(np.stack([cols, rows])), torch.tensor(vals, dtype=dtype)  # P^T: (j, i)
                mixer = torch.sparse_coo_tensor(at, values, (n, n), check_invariants=True).coalesce()
            else:
                mixer = torch.tensor(ph.matrix.T, dtype=dtype)
            self._phases.append((mixer, mixes_roles))

    # -- construction helpers ------------------------------------------------------
    @staticmethod
    def _make_opt(factory, params) -> torch.optim.Optimizer:
        opt = factory(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise ConfigError(f"optimizer_factory: must return a torch.optim.Optimizer, got {type(opt).__name__}")
        return opt

    def _why_not_vectorized(self) -> str:
        """Why one optimizer over the (n, d) tensor would not equal the per-agent optimizers ("" if it would)."""
        if not callable(getattr(self.objective, "batched_grad", None)):
            return "the objective has no batched_grad(step, X, agents)"
        kinds = sorted({type(o).__name__ for o in self._opts})
        if any(type(o) not in _ELEMENTWISE for o in self._opts) or len(kinds) != 1:
            return f"the optimizers must all be one of SGD, Adam, AdamW, got {kinds}"
        first = self._opts[0]
        hyper = _hyper(first)
        if len(hyper) != 1:
            return "the optimizer has several param groups"
        if any(_hyper(o) != hyper for o in self._opts[1:]):
            return "the factory gives the fast agents different hyper-parameters"
        return ""

    # -- state -------------------------------------------------------------------------
    @property
    def buffers(self) -> str:
        """Deprecated name of :attr:`optimizer_state_policy`."""
        warnings.warn("Reference.buffers is deprecated; read optimizer_state_policy", DeprecationWarning, stacklevel=2)
        return self.optimizer_state_policy

    @property
    def k(self) -> int:
        """Number of steps taken so far."""
        return self._k

    @property
    def X(self) -> Tensor:
        """The de-biased models, (n, d): x_i / w_i for push-sum, x_i otherwise (a copy)."""
        return self._debiased().clone()

    @property
    def numerators(self) -> Tensor:
        """The stored rows x_i (push-sum numerators), (n, d) (a copy)."""
        return self._x.clone()

    @property
    def weights(self) -> Optional[Tensor]:
        """The push-sum weights w, (n,), or None for a column-stochastic schedule."""
        return None if self._w is None else self._w.clone()

    @property
    def last_update(self) -> Tensor:
        """Gr_k of the last step, (n, d): each agent's x before minus after its base step (zero rows when slow)."""
        return self._update.clone()

    @property
    def slow_model(self) -> Optional[Tensor]:
        """Slow momentum's z (a copy), or None without slow momentum."""
        return None if self._z is None else self._z.clone()

    @property
    def pending_slow(self) -> Optional[PendingSlow]:
        """The overlapped slow step in flight (a copy), or None (always None unless ``overlap_slow``)."""
        p = self._pending
        if p is None:
            return None
        w = None if p.weights is None else p.weights.clone()
        return PendingSlow(p.step, p.numerators.clone(), w, p.gamma, p.fragment)

    @property
    def outer(self) -> Optional[torch.optim.Optimizer]:
        """The outer optimizer over z built from ``slow_momentum.outer`` (None without it)."""
        return self._outer

    @property
    def optimizers(self) -> List[torch.optim.Optimizer]:
        """One optimizer per fast agent (in agent order), or the single (n, d) optimizer when vectorized."""
        return list(self._opts)

    def optimizer_state(self, agent: int) -> dict:
        """The base-optimizer state of ``agent`` ({} for a slow agent): the live (d,) tensors, on both paths."""
        if agent not in self.fast:
            return {}
        if self.vectorized:
            st = self._opts[0].state.get(self._x, {})
            return {k: (v[agent] if isinstance(v, Tensor) and v.shape == self._x.shape else v) for k, v in st.items()}
        r = self.fast.index(agent)
        return dict(self._opts[r].state.get(self._leaves[r], {}))

    def _debiased(self) -> Tensor:
        x = self._x
        return x / self._w.unsqueeze(1) if self.push_sum else x

    def _lr(self) -> float:
        return float(_plain(self._opts[0].param_groups[0]["lr"]))

    # -- one step ----------------------------------------------------------------------
    def step(self) -> None:
        """Advance one step k -> k + 1 (the stages of the module docstring, in ``order``)."""
        k, sm = self._k, self.slow_momentum
        mixer, mixes_roles = self._phases[self.schedule.phase_index(k)]
        combine_first = self.order == "combine_then_adapt"
        if sm is not None:
            for f, o in enumerate(self._offsets):
                if k == 0 or (k - o) % sm.tau == 0:
                    self._gammas[f] = self._lr()
                    if not self._gammas[f] > 0.0 and (sm.outer is None or sm.scale_by_gamma):
                        raise ConfigError(
                            f"slow_momentum: needs a positive fast learning rate, got lr={self._gammas[f]!r} "
                            f"at step {k}"
                        )
        with torch.no_grad():
            if not combine_first:
                self._update.copy_(self._x)  # x before the base step; minus x after it below
            loss, grads = self._gradients(k, self._debiased())
            self._last_loss = torch.full((self.n,), math.nan, dtype=torch.float64)
            self._last_gnorm = torch.full((self.n,), math.nan, dtype=torch.float64)
            self._last_loss[self.fast] = loss.to(torch.float64)
            self._last_gnorm[self.fast] = torch.linalg.vector_norm(grads, dim=1).to(torch.float64)
            if self.grad_mixing == "average":
                grads = grads.mean(dim=0, keepdim=True).expand_as(grads).clone()
            if combine_first:
                if mixer is not None:
                    self._mix(mixer)  # the gradients were taken at the point before this combine
                self._update.copy_(self._x)  # the combined x before the base step
            if self.vectorized:
                self._base_step_vectorized(grads)
            else:
                self._base_step_per_agent(grads)
            self._update.sub_(self._x)
            if mixer is not None and not combine_first:
                self._mix(mixer)
            slow_step = mixes_roles
            due = None if sm is None else fragment_due(k + 1, sm.tau, self._offsets)
            if sm is not None and self.overlap_slow:
                if self._pending is not None:
                    self._apply_pending_slow()
                    slow_step = True
                if due is not None:
                    w = None if self._w is None else self._w.clone()
                    self._pending = PendingSlow(k, self._x.clone(), w, self._gammas[due], due)
            elif due is not None:
                self._slow_momentum_step(due)
                slow_step = True
            if slow_step:
                self._sync_buffers()
        self._k = k + 1

    def _gradients(self, k: int, Z: Tensor):
        """Losses (m,) and gradients (m, d) of the fast agents at their de-biased models."""
        if self.vectorized:
            rows = Z if len(self.fast) == self.n else Z[self.fast]
            loss, G = self.objective.batched_grad(k, rows, list(self.fast))
            return torch.as_tensor(loss).to(self.dtype), G.to(self.dtype)
        losses, grads = [], []
        for i in self.fast:
            loss, g = self.objective.loss_and_grad(i, k, Z[i].clone())
            losses.append(torch.as_tensor(loss).to(self.dtype).reshape(()))
            grads.append(g.to(self.dtype).reshape(self.d))
        return torch.stack(losses), torch.stack(grads)

    def _base_step_per_agent(self, grads: Tensor) -> None:
        for r, i in enumerate(self.fast):
            p, opt = self._leaves[r], self._opts[r]
            p.copy_(self._x[i])
            p.grad = grads[r].clone()
            opt.step()
            p.grad = None
            self._x[i] = p

    def _base_step_vectorized(self, grads: Tensor) -> None:
        x = self._x
        if self.slow:
            g = torch.zeros_like(x)
            g[self.fast] = grads
        else:
            g = grads
        saved = x[self.slow].clone() if self.slow else None
        x.grad = g
        self._opts[0].step()
        x.grad = None
        if saved is not None:
            x[self.slow] = saved  # nothing ever steps a slow agent (weight decay would)

    def _mix(self, mixer: Tensor) -> None:
        """Xr <- P^T Xr and w <- P^T w."""
        torch.mm(mixer, self._x, out=self._scratch)  # mixer is P^T, dense or sparse COO
        self._x.copy_(self._scratch)
        if self.push_sum:
            self._w = torch.mm(mixer, self._w.unsqueeze(1)).squeeze(1)

    def _slow_layout(self, sm: SlowMomentum) -> None:
        """Fragments' element ranges, their sync offsets, and the outer optimizer over views of z."""
        F, d = sm.fragments, self.d
        if sm.param_shapes is not None:
            shapes = [tuple(int(s) for s in shape) for shape in sm.param_shapes]
            sizes = [math.prod(shape) for shape in shapes]
            if sum(sizes) != d:
                raise ConfigError(f"slow_momentum.param_shapes: their sizes sum to {sum(sizes)}, not d = {d}")
            bounds = split_fragments(sizes, F, where="slow_momentum.fragments")
            starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
            self._frags = [(starts[bounds[f]], starts[bounds[f + 1]]) for f in range(F)]
            self._outer_range = [(bounds[f], bounds[f + 1]) for f in range(F)]
            units = [(starts[i], sizes[i], shapes[i]) for i in range(len(sizes))]
        else:
            if F > d:
                raise ConfigError(f"slow_momentum.fragments: {F} fragments need d >= {F}, got d = {d}")
            self._frags = [(f * d // F, (f + 1) * d // F) for f in range(F)]
            self._outer_range = [(f, f + 1) for f in range(F)]
            units = [(lo, hi - lo, (hi - lo,)) for lo, hi in self._frags]
        self._units = units
        self._offsets = fragment_offsets(sm.tau, F)
        self._gammas: List[Optional[float]] = [None] * F
        self._outer = None
        if sm.outer is not None:
            params = (
                [self._z] if F == 1 and sm.param_shapes is None else [self._z[o : o + n].view(s) for o, n, s in units]
            )
            why = f"fragments={F} steps a part of its parameters at a time" if F > 1 else ""
            self._outer = build_outer(sm.outer, params, where="slow_momentum.outer", elementwise_only=why)
            self._outer_params = params

    def _outer_step(self, x: Tensor, w: Optional[Tensor], gamma: float, f: int = 0) -> None:
        """The slow step of fragment f from the fast agents' exact average x_bar in x (the rule or the outer).

        Rule: u <- beta u + (z - x_bar) / gamma;  z <- z - alpha gamma u (on the fragment's slice).
        """
        sm = self.slow_momentum
        lo, hi = self._frags[f]
        xs = x if sm.fragments == 1 else x[:, lo:hi]
        if self.push_sum:
            x_bar = xs[self.fast].sum(dim=0) / w[self.fast].sum()
        else:
            x_bar = xs[self.fast].mean(dim=0)
        if sm.outer is None and sm.fragments == 1:
            self._u = sm.beta * self._u + (self._z - x_bar) / gamma
            self._z = self._z - sm.alpha * gamma * self._u
        elif sm.outer is None:
            self._u[lo:hi] = sm.beta * self._u[lo:hi] + (self._z[lo:hi] - x_bar) / gamma
            self._z[lo:hi] = self._z[lo:hi] - sm.alpha * gamma * self._u[lo:hi]
        else:
            delta = self._z[lo:hi] - x_bar  # the pseudo-gradient
            a, b = self._outer_range[f]
            grads = [delta[o - lo : o - lo + n].view(s) for o, n, s in self._units[a:b]]
            if sm.fragments == 1 and sm.param_shapes is None:
                grads = [delta]
            scale = gamma if sm.scale_by_gamma else None
            outer_step(self._outer, self._outer_params[a:b], grads, gamma=scale)

    def _set_fragment(self, f: int, values: Tensor) -> None:
        """Every agent's de-biased model on fragment f <- ``values`` (broadcast); the weights are kept."""
        lo, hi = self._frags[f]
        if self.push_sum:
            self._x[:, lo:hi] = values * self._w.unsqueeze(1)
        else:
            self._x[:, lo:hi] = values

    def _slow_momentum_step(self, f: int = 0) -> None:
        self._outer_step(self._x, self._w, self._gammas[f], f)
        if self.slow_momentum.fragments > 1:
            lo, hi = self._frags[f]
            self._set_fragment(f, self._z[lo:hi])
            return
        self._x.copy_(self._z.expand_as(self._x))
        if self.push_sum:
            self._w = torch.ones_like(self._w)

    def _apply_pending_slow(self) -> None:
        """The overlapped slow step: z from what was sent; every agent <- z + (its model now - its model sent)."""
        sent, self._pending = self._pending, None
        f = sent.fragment
        self._outer_step(sent.numerators, sent.weights, sent.gamma, f)
        z_sent = sent.numerators / sent.weights.unsqueeze(1) if self.push_sum else sent.numerators
        if self.slow_momentum.fragments > 1:
            lo, hi = self._frags[f]
            delta = self._debiased()[:, lo:hi] - z_sent[:, lo:hi]
            self._set_fragment(f, self._z[lo:hi] + delta)
            return
        delta = self._debiased() - z_sent  # the local progress made while the sync was in flight
        self._x.copy_(self._z + delta)  # in place: the vectorized optimizer holds this tensor
        if self.push_sum:
            self._w = torch.ones_like(self._w)

    def _sync_buffers(self) -> None:
        if self.optimizer_state_policy == "reset":
            for opt in self._opts:
                opt.state.clear()
        elif self.optimizer_state_policy == "average":
            if self.vectorized:
                for v in self._opts[0].state.get(self._x, {}).values():
                    if isinstance(v, Tensor) and v.is_floating_point() and v.shape == self._x.shape:
                        v[self.fast] = v[self.fast].mean(dim=0)
                return
            states = [opt.state.get(p, {}) for opt, p in zip(self._opts, self._leaves)]
            for key, v0 in states[0].items():
                if isinstance(v0, Tensor) and v0.is_floating_point() and v0.shape == (self.d,):
                    mean = torch.stack([st[key] for st in states]).mean(dim=0)
                    for st in states:
                        st[key].copy_(mean)

    # -- runs ---------------------------------------------------------------------------
    def run(self, steps: int) -> Trace:
        """Take ``steps`` steps and return what was recorded (see :class:`Trace`)."""
        check_int(steps, "steps", low=0)
        k0, n, d = self._k, self.n, self.d
        end = k0 + steps
        snap = {k for k in self.record_steps if k0 <= k <= end} | {end}
        if self.record_every is not None:
            snap |= {k for k in range(k0, end + 1) if k % self.record_every == 0}
        f64 = torch.float64
        y = torch.empty(steps + 1, d, dtype=f64)
        loss = torch.empty(steps, n, dtype=f64)
        gnorm = torch.empty(steps, n, dtype=f64)
        cons = torch.empty(steps + 1, dtype=f64)
        wts = torch.empty(steps + 1, n, dtype=f64) if self.push_sum else None
        shots: Dict[int, Tensor] = {}

        def record(s: int) -> None:
            x = self._x
            y[s] = (self.a @ x).to(f64)
            Z = self._debiased()
            cons[s] = torch.linalg.vector_norm(torch.sub(Z, Z.mean(dim=0), out=self._scratch), dtype=f64)
            if wts is not None:
                wts[s] = self._w.to(f64)
            if k0 + s in snap:
                shots[k0 + s] = Z.to(f64).clone()

        record(0)
        for s in range(steps):
            self.step()
            loss[s], gnorm[s] = self._last_loss, self._last_gnorm
            record(s + 1)
        return Trace(k0, y, loss, gnorm, cons, shots, wts, self.a.to(f64), self.a_invariant)


def simulate(schedule: Schedule, roles: Sequence[str], x0, objective, optimizer_factory, steps: int, **kw) -> Trace:
    """``Reference(schedule, roles, x0, objective, optimizer_factory, **kw).run(steps)``."""
    return Reference(schedule, roles, x0, objective, optimizer_factory, **kw).run(steps)
