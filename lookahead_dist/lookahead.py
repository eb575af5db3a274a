"""Lookahead as a wrapper around any torch.optim optimizer.

Length: about 500 lines, kept in one file as torch.optim keeps sgd.py: the pure sync functions are the
class's math, and its checkpoint checks guard its own state-dict format.

Lookahead is the two-agent case of X_{k+1} = (X_k - G_k) P_k (paper eq. 4):
the fast agent x is the model's parameters, stepped by the inner optimizer;
the slow agent z holds the slow weights and never computes a gradient. P_k is
the identity except when (k + 1) mod tau == 0, where P_k = a 1^T with
a = [alpha, 1 - alpha]^T (eq. 5). At such a sync both agents become

    z <- z + alpha (x - z),    x <- z

which is line 6 and then line 2 of the paper's Algorithm 1.

The math lives in small functions over lists of tensors
(:func:`lookahead_sync_`, :func:`reset_momentum_`, :func:`pullback_momentum_`);
:class:`Lookahead` only gathers state and calls them.

Example::

    >>> import torch
    >>> from lookahead_dist.lookahead import Lookahead
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), tau=5, alpha=0.5)
    >>> for _ in range(10):
    ...     opt.zero_grad()
    ...     model(torch.ones(2, 4)).pow(2).mean().backward()
    ...     _ = opt.step()
    >>> opt.step_count
    10
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from lookahead_dist.errors import ConfigError
from lookahead_dist.optim_utils import WrapperOptimizer
from lookahead_dist.validation import check_choice, check_lookahead_alpha, check_tau

__all__ = [
    "FIRST_MOMENT_KEYS",
    "PULLBACK_MODES",
    "Lookahead",
    "lookahead_sync_",
    "pullback_momentum_",
    "reset_momentum_",
    "slow_dtype",
]

PULLBACK_MODES = ("none", "reset", "pullback")

#: Inner-state keys of the first-moment buffer: SGD/RMSprop and the Adam family.
FIRST_MOMENT_KEYS = ("momentum_buffer", "exp_avg")

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def slow_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the slow weights for a parameter of ``dtype``.

    float16 and bfloat16 get float32, so that the small steps alpha (x - z)
    are not rounded away; every other dtype is kept.
    """
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _group_pairs(first: list[Tensor], second: list[Tensor]) -> dict:
    """Group index-aligned pairs by (device, dtype of first, dtype of second)."""
    groups: dict = {}
    for a, b in zip(first, second):
        entry = groups.setdefault((a.device, a.dtype, b.dtype), ([], []))
        entry[0].append(a)
        entry[1].append(b)
    return groups


def _single_tensor_sync_(fast: list[Tensor], slow: list[Tensor], alpha: float) -> None:
    for x, z in zip(fast, slow):
        z.lerp_(x if x.dtype == z.dtype else x.to(z.dtype), alpha)
        x.copy_(z)


def _multi_tensor_sync_(fast: list[Tensor], slow: list[Tensor], alpha: float) -> None:
    """Sync one group that shares a device, a fast dtype and a slow dtype."""
    if not fast:
        return
    ends = fast if fast[0].dtype == slow[0].dtype else [x.to(slow[0].dtype) for x in fast]
    torch._foreach_lerp_(slow, ends, alpha)
    torch._foreach_copy_(fast, slow)


@torch.no_grad()
def lookahead_sync_(fast: list[Tensor], slow: list[Tensor], alpha: float, *, foreach: Optional[bool] = None) -> None:
    """One Lookahead sync, in place: X <- X a 1^T with a = [alpha, 1 - alpha]^T (eq. 5).

    For every pair, ``z <- z + alpha (x - z)`` then ``x <- z``. ``slow[i]`` may
    have a wider dtype than ``fast[i]`` (see :func:`slow_dtype`); the fast
    tensor then receives the slow value rounded to its own dtype. With
    ``alpha = 1`` the fast tensors are left bitwise unchanged.
    ``foreach=None`` uses the multi-tensor path, grouped by device and dtype.
    """
    if foreach is False:
        _single_tensor_sync_(fast, slow, alpha)
        return
    for xs, zs in _group_pairs(fast, slow).values():
        _multi_tensor_sync_(xs, zs, alpha)


@torch.no_grad()
def reset_momentum_(buffers: list[Tensor], *, foreach: Optional[bool] = None) -> None:
    """Zero every first-moment buffer (``pullback="reset"``)."""
    if foreach is False:
        for m in buffers:
            m.zero_()
        return
    for ms, _ in _group_pairs(buffers, buffers).values():
        torch._foreach_zero_(ms)


@torch.no_grad()
def pullback_momentum_(
    buffers: list[Tensor], snapshots: list[Tensor], alpha: float, *, foreach: Optional[bool] = None
) -> None:
    """Interpolate first moments toward the previous sync's: m <- alpha m + (1 - alpha) s; s <- m.

    ``s`` is a copy (never an alias) of the buffer as it stood after the
    previous sync, zeros before the first. ``snapshots[i]`` must match
    ``buffers[i]`` in device and dtype.
    """
    if foreach is False:
        for m, s in zip(buffers, snapshots):
            m.lerp_(s, 1.0 - alpha)
            s.copy_(m)
        return
    for ms, ss in _group_pairs(buffers, snapshots).values():
        torch._foreach_lerp_(ms, ss, 1.0 - alpha)
        torch._foreach_copy_(ss, ms)


def _check_args(tau: Any, alpha: Any, pullback: Any) -> tuple[int, float, str]:
    """Validated (tau, alpha, pullback); a :class:`ConfigError` names the argument, rule and value."""
    return (
        check_tau(tau, "Lookahead: tau (inner steps between syncs)"),
        check_lookahead_alpha(alpha, "Lookahead: alpha (slow step size)"),
        check_choice(pullback, "Lookahead: pullback", PULLBACK_MODES),
    )


def _first_moment_key(optimizer: torch.optim.Optimizer, groups: list[dict], pullback: str) -> Optional[str]:
    """The inner-state key that ``pullback`` acts on, or None for ``"none"``.

    SGD and RMSprop keep ``momentum_buffer`` (only when momentum > 0); the
    Adam family (a ``betas`` hyperparameter) keeps ``exp_avg``.
    """
    if pullback == "none":
        return None
    name = type(optimizer).__name__
    defaults = optimizer.defaults
    if "betas" in defaults:
        return "exp_avg"
    if "momentum" in defaults:
        for i, group in enumerate(groups):
            momentum = group.get("momentum", defaults["momentum"])
            if not momentum > 0:
                raise ConfigError(
                    f"Lookahead: pullback={pullback!r} needs a first-moment buffer, but "
                    f"{name} param group {i} has momentum={momentum!r}; use momentum > 0 "
                    f"or pullback='none'"
                )
        return "momentum_buffer"
    raise ConfigError(
        f"Lookahead: pullback={pullback!r} needs an inner optimizer with a first-moment buffer "
        f"(one of {FIRST_MOMENT_KEYS}); {name} has none, use pullback='none'"
    )


def _check_params(groups: list[dict], where: str) -> None:
    for i, group in enumerate(groups):
        for j, p in enumerate(group["params"]):
            if not p.is_floating_point() or p.layout != torch.strided:
                raise ConfigError(
                    f"Lookahead: {where}[{i}]['params'][{j}] must be a dense floating-point "
                    f"tensor, got dtype={p.dtype}, layout={p.layout}"
                )


def _check_saved(params: dict[int, Tensor], saved: dict, name: str) -> None:
    for i, value in saved.items():
        if i not in params:
            raise ConfigError(
                f"Lookahead.load_state_dict: state_dict['lookahead']['{name}'] has index {i!r}, "
                f"but the optimizer's parameter indices are 0..{len(params) - 1}"
            )
        if tuple(value.shape) != tuple(params[i].shape):
            raise ConfigError(
                f"Lookahead.load_state_dict: state_dict['lookahead']['{name}'][{i}] must have "
                f"the parameter's shape {tuple(params[i].shape)}, got {tuple(value.shape)}"
            )


class _DtypeBuckets:
    """(device, dtype) buckets of (fast, slow) pairs, and the param_groups they were built from (a cache)."""

    def __init__(self, groups: list[dict], buckets: list[tuple]):
        self.groups, self.buckets = groups, buckets  # bucket: (device, dtype, foreach, fast, slow)
        self.param_lists = [(g["params"], len(g["params"])) for g in groups]

    def valid_for(self, groups: list[dict]) -> bool:
        """Same groups and parameter lists, and every parameter still on its bucket's device and dtype."""
        if groups is not self.groups or len(groups) != len(self.param_lists):
            return False
        if any(g["params"] is not ps or len(ps) != n for g, (ps, n) in zip(groups, self.param_lists)):
            return False
        return all(x.device == device and x.dtype == dtype for device, dtype, _, fast, _ in self.buckets for x in fast)


class Lookahead(WrapperOptimizer):
    r"""Lookahead (Zhang et al., 2019) around any ``torch.optim`` optimizer.

    Every :meth:`step` runs one inner step on the fast weights x. After every
    ``tau``-th step (step counts k + 1 = tau, 2 tau, ...) the slow weights z
    and the fast weights meet (paper eq. 5, Algorithm 1 lines 6 and 2)::

        z <- z + alpha (x - z);   x <- z

    The slow weights start as a copy of the parameters at construction, so
    the first sync comes after exactly ``tau`` steps and is anchored at the
    starting point. ``alpha = 1`` is the inner optimizer alone; ``tau = 1``
    mixes after every step.

    Args:
        optimizer: the inner optimizer (any :class:`torch.optim.Optimizer`).
            The wrapper shares its ``param_groups`` list and ``state``;
            nothing is added to the inner state.
        tau: inner steps per sync (the ``k`` of other libraries), int >= 1.
        alpha: slow step size in (0, 1].
        pullback: what happens to the inner first-moment buffer
            (``momentum_buffer`` for SGD, ``exp_avg`` for the Adam family)
            at a sync: ``"none"`` leaves it; ``"reset"`` zeroes it;
            ``"pullback"`` sets m <- alpha m + (1 - alpha) s, with s a copy of
            m taken at the previous sync (zeros before the first). Second
            moments and step counts are never touched.
        foreach: ``None`` (auto) or ``True`` runs the sync as
            ``torch._foreach_*`` calls, one per (device, dtype) group;
            ``False`` loops over tensors.

    Slow weights (``slow_state[p]["slow_param"]``) are leaf tensors without
    grad, on the parameter's device and in its dtype, except that float16 and
    bfloat16 parameters get float32 slow weights. When a parameter moves to
    another device or dtype after construction, its slow weights follow at
    the next sync. ``pullback="pullback"`` adds one snapshot per parameter
    (``slow_state[p]["momentum_snapshot"]``).

    Every parameter in ``param_groups`` is synced, with or without a grad and
    whether or not it requires grad: one the inner optimizer did not move
    since the last sync has x == z, and the sync leaves it bitwise unchanged.
    A parameter overwritten by hand between syncs would be pulled back toward
    its slow weights; call :meth:`reset_slow_weights` after loading new model
    weights without a matching optimizer checkpoint.

    The step counter advances only inside :meth:`step`, so a step skipped by
    ``torch.amp.GradScaler`` (inf/NaN gradients) does not count.

    Checkpoints follow the ``torch.optim`` format: :meth:`state_dict` is the
    inner optimizer's (``"state"`` and ``"param_groups"``, keyed by
    parameter index) plus a ``"lookahead"`` entry::

        {"tau": int, "alpha": float, "pullback": str, "step_count": int,
         "slow_params": {index: Tensor},
         "momentum_snapshots": {index: Tensor}}   # pullback="pullback" only

    :meth:`load_state_dict` restores tau, alpha and pullback from the
    checkpoint (as torch.optim restores the hyperparameters of each param
    group) and accepts a bare inner-optimizer checkpoint, in which case the
    slow weights restart from the current parameters and the counter from 0.
    :meth:`inner_state_dict` turns a wrapper checkpoint into one that the
    bare inner optimizer loads.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        tau: int = 5,
        alpha: float = 0.5,
        pullback: str = "none",
        *,
        foreach: Optional[bool] = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"Lookahead: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not (foreach is None or isinstance(foreach, bool)):
            raise ConfigError(f"Lookahead: foreach must be None, True or False, got {foreach!r}")
        self.tau, self.alpha, self.pullback = _check_args(tau, alpha, pullback)
        self.foreach = foreach
        _check_params(optimizer.param_groups, "optimizer.param_groups")
        self._momentum_key = _first_moment_key(optimizer, optimizer.param_groups, self.pullback)
        super().__init__(optimizer)
        self.step_count = 0  #: optimizer steps taken (skipped GradScaler steps excluded)
        self.slow_state: dict[Tensor, dict[str, Tensor]] = {}
        self._buckets: Optional[_DtypeBuckets] = None
        self._init_slow_state(self._flat_params())

    def _flat_params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @torch.no_grad()
    def _init_slow_state(self, params: list[Tensor]) -> None:
        for p in params:
            entry = {"slow_param": p.detach().to(dtype=slow_dtype(p.dtype), copy=True)}
            if self.pullback == "pullback":
                entry["momentum_snapshot"] = torch.zeros_like(p, requires_grad=False)
            self.slow_state[p] = entry
        self._buckets = None

    def reset_slow_weights(self) -> None:
        """Restart the slow weights from the current parameters: z <- x.

        The step counter and the momentum snapshots are kept.
        """
        for p in self._flat_params():
            self.slow_state[p]["slow_param"] = p.detach().to(dtype=slow_dtype(p.dtype), copy=True)
        self._buckets = None

    def _current_buckets(self) -> _DtypeBuckets:
        """Buckets of (fast, slow) pairs, rebuilt when parameters moved or groups changed."""
        groups = self.optimizer.param_groups
        cached = self._buckets
        if cached is not None and cached.valid_for(groups):
            return cached
        buckets: dict = {}
        seen: set[int] = set()
        for p in self._flat_params():
            if id(p) in seen:  # listed twice: sync it once
                continue
            seen.add(id(p))
            entry = self.slow_state.get(p)
            if entry is None:  # a group added to the inner optimizer directly
                self._init_slow_state([p])
                entry = self.slow_state[p]
            z = entry["slow_param"]
            if z.device != p.device or z.dtype != slow_dtype(p.dtype):
                z = entry["slow_param"] = z.to(device=p.device, dtype=slow_dtype(p.dtype))
            s = entry.get("momentum_snapshot")
            if s is not None and s.device != p.device:
                entry["momentum_snapshot"] = s.to(device=p.device)
            bucket = buckets.setdefault((p.device, p.dtype), (p.device, p.dtype, self.foreach is not False, [], []))
            bucket[3].append(p)
            bucket[4].append(z)
        self._buckets = _DtypeBuckets(groups, list(buckets.values()))
        return self._buckets

    def step(self, closure: Optional[Callable[[], float]] = None):  # type: ignore[override]
        """One inner step; after every ``tau``-th, a sync (eq. 5). Returns the closure's loss."""
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        self.step_count += 1
        if self.step_count % self.tau == 0:
            self._sync()
        return loss

    @torch.no_grad()
    def _sync(self) -> None:
        buckets = self._current_buckets()
        for _, _, foreach, fast, slow in buckets.buckets:
            if foreach:
                _multi_tensor_sync_(fast, slow, self.alpha)
            else:
                _single_tensor_sync_(fast, slow, self.alpha)
        if self._momentum_key is not None:
            self._apply_pullback(buckets)

    def _apply_pullback(self, buckets: _DtypeBuckets) -> None:
        inner_state = self.optimizer.state
        key = self._momentum_key
        buffers, snapshots = [], []
        for p in (p for bucket in buckets.buckets for p in bucket[3]):
            m = inner_state[p].get(key) if p in inner_state else None
            if m is None:  # never stepped: nothing to pull back
                continue
            buffers.append(m)
            if self.pullback == "pullback":
                entry = self.slow_state[p]
                s = entry["momentum_snapshot"]
                if s.device != m.device or s.dtype != m.dtype:
                    s = entry["momentum_snapshot"] = s.to(device=m.device, dtype=m.dtype)
                snapshots.append(s)
        if self.pullback == "reset":
            reset_momentum_(buffers, foreach=self.foreach)
        else:
            pullback_momentum_(buffers, snapshots, self.alpha, foreach=self.foreach)

    @contextlib.contextmanager
    def slow_weights(self) -> Iterator[None]:
        """Context manager: the parameters hold the slow weights z inside the block.

        The fast weights are restored bitwise on exit, also on an exception.
        Use it to evaluate the slow model (Algorithm 1 returns z)::

            with opt.slow_weights():
                evaluate(model)
        """
        buckets = self._current_buckets().buckets
        with torch.no_grad():
            saved = [[x.detach().clone() for x in fast] for _, _, _, fast, _ in buckets]
            for _, _, _, fast, slow in buckets:
                torch._foreach_copy_(fast, slow)
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, _, _, fast, _), backup in zip(buckets, saved):
                    torch._foreach_copy_(fast, backup)

    @torch._disable_dynamo
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer; its slow weights start from its current values."""
        n_old = len(self._flat_params())
        if self._momentum_key == "momentum_buffer":
            _first_moment_key(self.optimizer, [param_group], self.pullback)
        self.optimizer.add_param_group(param_group)
        try:
            _check_params(self.optimizer.param_groups[-1:], "param_group")
        except ConfigError:
            self.optimizer.param_groups.pop()
            raise
        self._init_slow_state(self._flat_params()[n_old:])

    def _param_index(self) -> dict[int, Tensor]:
        """index -> parameter, numbered as torch.optim's state_dict numbers them."""
        seen: dict[int, tuple[int, Tensor]] = {}
        for i, p in enumerate(self._flat_params()):
            seen.setdefault(id(p), (i, p))
        return dict(seen.values())

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus a ``"lookahead"`` entry (see the class docs)."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        self._current_buckets()  # slow weights exist and sit beside their parameters
        params = self._param_index()
        own: dict[str, Any] = {
            "tau": self.tau,
            "alpha": self.alpha,
            "pullback": self.pullback,
            "step_count": self.step_count,
            "slow_params": {i: self.slow_state[p]["slow_param"] for i, p in params.items()},
        }
        if self.pullback == "pullback":
            own["momentum_snapshots"] = {i: self.slow_state[p]["momentum_snapshot"] for i, p in params.items()}
        state_dict = dict(self.optimizer.state_dict())
        state_dict["lookahead"] = own
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    @staticmethod
    def inner_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
        """The inner optimizer's own checkpoint inside a wrapper checkpoint.

        ``bare_optimizer.load_state_dict(Lookahead.inner_state_dict(ckpt))``
        resumes the inner optimizer without Lookahead.
        """
        return {k: v for k, v in state_dict.items() if k != "lookahead"}

    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint from :meth:`state_dict`, or one of the bare inner optimizer."""
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        own = state_dict.get("lookahead")
        params = self._param_index()
        if own is not None:  # check everything before anything changes
            tau, alpha, pullback = _check_args(own["tau"], own["alpha"], own["pullback"])
            key = _first_moment_key(self.optimizer, state_dict["param_groups"], pullback)
            for name in ("slow_params", "momentum_snapshots"):
                _check_saved(params, own.get(name, {}), name)
        self.optimizer.load_state_dict(self.inner_state_dict(state_dict))
        self.slow_state = {}
        if own is None:
            self.step_count = 0
            self._init_slow_state(params.values())
        else:
            self.tau, self.alpha, self.pullback, self._momentum_key = tau, alpha, pullback, key
            self.step_count = int(own["step_count"])
            self._init_slow_state(params.values())
            self._load_tensors(params, own.get("slow_params", {}), "slow_param", slow_dtype)
            if pullback == "pullback":
                self._load_tensors(params, own.get("momentum_snapshots", {}), "momentum_snapshot", None)
        self._buckets = None
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    @torch.no_grad()
    def _load_tensors(self, params: dict[int, Tensor], saved: dict, name: str, dtype_rule) -> None:
        for i, value in saved.items():
            p = params[i]
            dtype = dtype_rule(p.dtype) if dtype_rule is not None else value.dtype
            self.slow_state[p][name] = value.detach().to(device=p.device, dtype=dtype, copy=True)

    _PICKLED = ("optimizer", "tau", "alpha", "pullback", "foreach", "_momentum_key", "step_count", "slow_state")

    def __getstate__(self) -> dict[str, Any]:
        # Hooks and a scheduler's wrapped ``step`` stay behind, as with torch.optim.
        return {name: getattr(self, name) for name in self._PICKLED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "_steps" in state:  # pickled before the counter was named step_count
            state = dict(state, step_count=state.pop("_steps"))
        self.__dict__.update(state)
        self._buckets = None
        self._init_base_attributes()

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (
            f"Lookahead(tau={self.tau}, alpha={self.alpha}, pullback={self.pullback!r}, "
            f"step_count={self.step_count}) (\n{inner}\n)"
        )
