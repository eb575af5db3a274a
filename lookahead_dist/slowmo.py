"""SlowMo: slow momentum on top of a base algorithm, the many-agent Lookahead; DiLoCo with ``outer=``.

Length: about 640 lines, kept whole on purpose: the blocking, sharded, fragmented, compressed and overlapped
slow steps share one layout (which slice of z, u and the outer optimizer each sync touches), and
reading them side by side is how their equality with the reference engine is checked.

Every ``tau`` base steps the workers' models are averaged exactly and the slow
agents (a slow copy z beside each worker) take a momentum step (Wang, Tantia,
Ballas, Rabbat, "SlowMo", ICLR 2020, Algorithm 1)::

    x_bar <- (1/m) sum_i x_i               (push-sum: sum of numerators / sum of weights)
    u     <- beta u + (z - x_bar) / gamma   (gamma: the fast learning rate at the window's start)
    z     <- z - alpha gamma u
    x_i   <- z for every worker              (push-sum weights reset to 1)

With beta = 0 this is the matrix step z, x_i <- (1 - alpha) z + alpha x_bar;
one worker with beta = 0 is Lookahead; alpha = 1, beta = 0 is the base
algorithm followed by an exact average every tau steps (for local SGD, local
SGD itself). With beta > 0 the slow step equals torch.optim.SGD(lr = alpha
gamma, momentum = beta) on the pseudo-gradient (z - x_bar) / gamma. Model
buffers (BatchNorm statistics, with ``mix_buffers``) take x_bar only: momentum
would extrapolate a running variance below zero.

The base algorithm between slow steps is chosen by ``base``:

* ``None`` (local SGD): no communication between slow steps; also the choice
  for all-reduce SGD, where the user wraps the model in
  ``torch.nn.parallel.DistributedDataParallel`` so that gradients are averaged
  every step and the workers never drift apart;
* a gossip topology (YAML file, mapping or Topology): D-PSGD for a
  column-stochastic graph, SGP for a push-sum one, mixed after every base step.

Overlap. ``overlap=True`` runs the gossip base in combine-then-adapt order with
each exchange behind the next forward and backward (see
:class:`~lookahead_dist.decentralized.Decentralized`). ``overlap_slow=True``
overlaps the slow step itself: at a slow step the all-reduce of the workers'
average starts and training goes on locally; one base step later the result is
applied with a delay correction that keeps the local progress made meanwhile::

    end of step k, (k + 1) % tau == 0:  x_sent <- x; start the all-reduce of x_sent
    end of step k + 1:                   wait; x_bar; u, z as above (gamma of the ended window)
                                         x <- z + (x - x_sent)    (push-sum weights <- 1)

This is Streaming DiLoCo's overlapped outer sync (Douillard et al., 2025) with
an overlap of exactly one inner step and the local progress kept whole: their
merge mixes the received global parameters with the local ones, here the local
delta made since the send is added to the new slow model with weight 1. The
reference engine's ``overlap_slow=True`` implements the same rule.

Outer optimizer (DiLoCo). ``outer=factory`` replaces the rule above by any
torch.optim optimizer over the slow copy: ``factory(params)`` receives one view
of z per model parameter (the model's shapes, registration order; they alias z,
nothing is copied) and at a slow step each receives the gradient z - x_bar,
``outer.step()`` runs and the workers take z. Model buffers (BatchNorm
statistics) are averaged and copied, never stepped. ``SGD(lr=alpha,
momentum=beta)`` is the rule above while the inner learning rate is constant;
``scale_by_gamma=True`` (gradient (z - x_bar) / gamma, the groups' lr times gamma
for the step) makes it the rule for any schedule. Sharded, the optimizer sees
this rank's flat slice of the first parameter group instead (element-wise
optimizers only, :data:`lookahead_dist.outer.ELEMENTWISE`); its state is sharded
with z. See :mod:`lookahead_dist.outer`.

Fragments (Streaming DiLoCo). ``fragments=F`` cuts the parameters, in
registration order, into F runs of nearly equal bytes ending at tensor
boundaries; fragment f syncs (average, rule or outer step, workers <- z, on its
slice only) at the end of the steps k with (k + 1 - floor(f tau / F)) mod tau = 0,
with gamma the inner lr at the start of its own window. Model buffers sync with
fragment 0. With push-sum and F > 1 the weights are not reset (the other
fragments' numerators still need them): a synced fragment's de-biased model
becomes z. F = 1 is the slow step above, bitwise. With ``overlap_slow`` each
fragment's all-reduce runs behind the next step, applied with the same delay
correction.

Defaults, from the SlowMo paper's experiments: alpha = 1.0 (the paper's main
setting), beta = 0.5 (the middle of its 0.4-0.7 range, good across its tasks),
tau = 12 (its default period for local SGD on ImageNet), base-optimizer
buffers kept across slow steps (its default).
"""

from __future__ import annotations

import warnings

import torch

from lookahead_dist.comm import Comm
from lookahead_dist.compress import CompressedSync, check_sync_dtype
from lookahead_dist.decentralized import Decentralized, check_elastic
from lookahead_dist.engine import AverageInFlight, exact_average_, start_exact_average
from lookahead_dist.errors import ConfigError
from lookahead_dist.flat import flatten_module
from lookahead_dist.optim_utils import STEP_KEY, WrapperOptimizer, saved_step_count
from lookahead_dist.outer import build_outer, fragment_due, fragment_offsets, outer_step, split_fragments
from lookahead_dist.validation import (
    OPTIMIZER_STATE_POLICIES,
    check_beta,
    check_fragments,
    check_optimizer_state,
    check_slow_alpha,
    check_tau,
)

__all__ = ["SlowMo", "slow_momentum_update"]

BUFFER_POLICIES = OPTIMIZER_STATE_POLICIES  # the former name


def slow_momentum_update(z, u, x_bar, *, alpha: float, beta: float, gamma: float) -> None:
    """In place over lists of tensors: u <- beta u + (z - x_bar)/gamma; z <- z - alpha gamma u.

    ``x_bar`` serves as scratch: it is overwritten with z - x_bar (no temporaries are allocated).
    """
    for zi, ui, xi in zip(z, u, x_bar):
        torch.sub(zi, xi, out=xi)
        ui.mul_(beta).add_(xi, alpha=1.0 / gamma)
        zi.add_(ui, alpha=-alpha * gamma)


def _check(tau, alpha, beta, optimizer_state, max_alpha, outer, scale_by_gamma, fragments, shard):
    """The arguments' checks; returns (alpha, beta, fragments), alpha and beta None with ``outer``."""
    check_tau(tau, "SlowMo: tau")
    if outer is not None:
        if alpha is not None or beta is not None:
            raise ConfigError(
                f"SlowMo: outer= replaces the slow-momentum rule, so alpha and beta must stay None with it "
                f"(got alpha={alpha!r}, beta={beta!r}); set the outer optimizer's lr and momentum instead"
            )
    else:
        if scale_by_gamma:
            raise ConfigError("SlowMo: scale_by_gamma=True scales an outer optimizer, but outer is None")
        alpha = check_slow_alpha(1.0 if alpha is None else alpha, "SlowMo: alpha", max_alpha=max_alpha)
        beta = check_beta(0.5 if beta is None else beta, "SlowMo: beta")
    check_optimizer_state(optimizer_state, "SlowMo: optimizer_state")
    fragments = check_fragments(fragments, tau, "SlowMo: fragments")
    if fragments > 1 and shard:
        raise ConfigError(f"SlowMo: fragments={fragments} and shard=True cannot be combined; choose one")
    if fragments > 1 and optimizer_state != "keep":
        raise ConfigError(
            f"SlowMo: fragments={fragments} needs optimizer_state='keep' (a fragment's sync cannot "
            f"{optimizer_state} the whole base optimizer's state), got {optimizer_state!r}"
        )
    return alpha, beta, fragments


class SlowMo(WrapperOptimizer):
    """Slow momentum around any torch.optim optimizer, one worker (fast agent) per rank.

    Args:
        optimizer: the base optimizer of this rank's model.
        model: this rank's model (its parameters become views of flat buffers).
        tau: base steps per slow step (default 12).
        alpha: slow learning rate (None: 1.0), in (0, max_alpha]; must be None with ``outer``.
        beta: slow momentum (None: 0.5), in [0, 1); must be None with ``outer``.
        base: None for local SGD (or all-reduce SGD with DDP), else a gossip topology.
        optimizer_state: the base optimizer's state at a slow step: "keep" (default), "reset" or "average".
            (Formerly ``buffers=``, still accepted with a DeprecationWarning.)
        shard: keep only a 1/world slice of the slow copy and the momentum on each rank
            (reduce-scatter, update, all-gather), same trajectory.
        comm: process-group wrapper (default: the default group).
        mix_buffers: average model buffers (BatchNorm statistics) at slow steps and in the gossip.
        max_alpha: upper limit accepted for alpha (default 1).
        overlap: run the gossip base overlapped, in combine-then-adapt order (needs ``base``).
        overlap_slow: overlap the slow step's all-reduce with the next base step (delay-corrected).
        outer: ``factory(params) -> torch.optim.Optimizer`` over views of the slow copy z (one per model
            parameter, or this rank's flat slice when sharded): the slow step's optimizer, stepped with the
            gradient z - x_bar (DiLoCo). Refused: optimizers that need a closure (LBFGS), sparse gradients
            (SparseAdam), and, with ``shard`` or ``fragments`` > 1, any not element-wise.
        scale_by_gamma: with ``outer``, step on (z - x_bar) / gamma with each group's lr times gamma
            (gamma: the inner lr at the window's start); SGD(lr=alpha, momentum=beta) is then the rule.
        fragments: sync the parameters in this many staggered fragments (1 <= fragments <= tau).
        sync_dtype: the slow step's wire format: None or "float32" (the exact average), "bfloat16" or "int8"
            (the pseudo-gradient z - x_r is averaged compressed, with error feedback:
            :class:`~lookahead_dist.compress.CompressedSync`); not with ``shard`` or ``overlap_slow``.
        elastic: check that this wrapper can run under elastic membership and record it: no ``overlap``,
            ``overlap_slow`` or ``shard``, a base of one fast agent per rank; ``outer``, ``fragments`` and a
            compressed ``sync_dtype`` are supported (after a membership change the error feedback of the chunk a
            rank owns restarts at zero: the chunks are cut by the world size).
            :class:`~lookahead_dist.regroup.Elastic` runs it, rebuilding it for each generation of members.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: torch.nn.Module,
        *,
        tau: int = 12,
        alpha: float | None = None,
        beta: float | None = None,
        base=None,
        optimizer_state: str = "keep",
        shard: bool = False,
        comm: Comm | None = None,
        mix_buffers: bool = True,
        max_alpha: float = 1.0,
        buffers: str | None = None,
        overlap: bool = False,
        overlap_slow: bool = False,
        outer=None,
        scale_by_gamma: bool = False,
        fragments: int = 1,
        sync_dtype: str | None = None,
        elastic: bool = False,
    ):
        if buffers is not None:
            warnings.warn(
                "SlowMo(buffers=...) is deprecated: the argument sets the base optimizer's state policy, "
                "so it is now called optimizer_state=",
                DeprecationWarning,
                stacklevel=2,
            )
            if optimizer_state != "keep" and optimizer_state != buffers:
                raise ConfigError(
                    f"SlowMo: optimizer_state={optimizer_state!r} and its deprecated spelling "
                    f"buffers={buffers!r} disagree; pass optimizer_state only"
                )
            optimizer_state = buffers
        alpha, beta, fragments = _check(
            tau, alpha, beta, optimizer_state, max_alpha, outer, scale_by_gamma, fragments, shard
        )
        if overlap and base is None:
            raise ConfigError(
                "SlowMo: overlap=True overlaps the gossip of a base topology, but base is None (local SGD "
                "sends nothing between slow steps); use overlap_slow=True to overlap the slow step"
            )
        if overlap_slow and shard:
            raise ConfigError("SlowMo: overlap_slow=True and shard=True cannot be combined; choose one")
        sync_dtype = check_sync_dtype(sync_dtype, "SlowMo: sync_dtype")
        if sync_dtype != "float32" and (shard or overlap_slow):
            raise ConfigError(
                f"SlowMo: sync_dtype={sync_dtype!r} compresses the blocking, unsharded slow step; it cannot be "
                f"combined with {'shard=True' if shard else 'overlap_slow=True'}"
            )
        if elastic:
            options = dict(overlap=overlap, overlap_slow=overlap_slow, shard=shard)
            check_elastic("SlowMo", None, 0, **options)
        super().__init__(optimizer)
        self.sync_dtype, self.elastic = sync_dtype, bool(elastic)
        self.overlap, self.overlap_slow = bool(overlap), bool(overlap_slow)
        self.tau, self.alpha, self.beta, self.shard = tau, alpha, beta, bool(shard)
        self.fragments, self.scale_by_gamma = fragments, bool(scale_by_gamma)
        self.optimizer_state = optimizer_state
        self.comm = comm or Comm()
        self.model = model
        if base is not None:
            self.base = Decentralized(
                optimizer, model, base, comm=self.comm, mix_buffers=mix_buffers, overlap=self.overlap,
                elastic=self.elastic,
            )  # fmt: skip
            topo = self.base.topology
            if topo.slow_agents or topo.n != self.comm.world_size:
                raise ConfigError(
                    f"{topo.source}: a SlowMo base topology needs one fast agent per rank and no slow agents "
                    f"(got {topo.n} agents, slow {list(topo.slow_agents)}, world size {self.comm.world_size})"
                )
            self.flat = self.base.flat
            self.push_sum = self.base.push_sum
        else:
            self.base = None
            self.flat = flatten_module(model, buffers=mix_buffers)
            self.push_sum = False
        lrs = self.comm.all_gather_object([g["lr"] for g in optimizer.param_groups])
        if any(lr != lrs[0] for lr in lrs):
            raise ConfigError(
                f"SlowMo: the base optimizer's learning rate differs across workers: {lrs}; "
                "every worker must use the same schedule"
            )
        values = self._values()
        # Sharded: this rank keeps chunk r (of ceil(N/W) elements, zero-padded) of the first group.
        self._chunk = -(-values[0].numel() // self.comm.world_size) if self.shard else 0
        self.slow = [self._own_part(v, i).clone() for i, v in enumerate(values)]
        self.momentum = [torch.zeros_like(z) for z in self.slow] if outer is None else []
        self._layout(model)
        self.outer = None
        if outer is not None:
            why = (
                "shard=True gives it flat slices of z"
                if self.shard
                else f"fragments={fragments} steps a part of its parameters at a time"
                if fragments > 1
                else ""
            )
            self.outer = build_outer(outer, self._outer_params, where="SlowMo", elementwise_only=why)
        self._pad = self._mine = None  # sharded slow step's scratch, allocated once
        self._slow_bytes = 0
        self.step_count = 0
        self._offsets = fragment_offsets(tau, fragments)
        self._gammas = [self.base_lr()] * fragments  # each fragment's gamma (its window's first inner lr)
        # overlapped slow step: the values sent, their average (in flight or done) and the window's gamma
        self._slow_avg: AverageInFlight | None = None
        self._slow_ready = False
        self._slow_sent = self._slow_red = None
        self._slow_gamma, self._slow_frag = self.gamma, 0
        self._slow_scratch: dict[int, tuple] = {}  # fragment -> (sent, reduced) buffers, allocated once
        # compressed sync: one per fragment (its residuals are shaped like the fragment)
        self._compress = [CompressedSync(sync_dtype) for _ in range(fragments)] if sync_dtype != "float32" else None
        if self.overlap_slow:
            self.comm.group(range(self.comm.world_size), channel="slow")  # every rank, at construction

    # -- layout -----------------------------------------------------------------
    def _values(self) -> list[torch.Tensor]:
        """This worker's flat model state, without the push-sum weight slot."""
        return self.flat.values()

    def _padded(self, v: torch.Tensor) -> torch.Tensor:
        pad = torch.zeros(self._chunk * self.comm.world_size, dtype=v.dtype, device=v.device)
        pad[: v.numel()].copy_(v)
        return pad

    def _own_part(self, v: torch.Tensor, group: int) -> torch.Tensor:
        """The slice of flat group ``group`` whose slow state lives here (all of it unless sharded).

        Sharding splits the first (parameter) group; the others (buffers, other dtypes) stay whole.
        """
        if self.shard and group == 0:
            r = self.comm.rank
            return self._padded(v.detach())[r * self._chunk : (r + 1) * self._chunk]
        return v.detach()

    def _layout(self, model: torch.nn.Module) -> None:
        """Which slices of the flat groups each fragment syncs, and the outer optimizer's views of z.

        ``self._parts[f]``: (group, lo, hi) per flat group fragment f touches (buffer groups: fragment 0);
        ``self._outer_params``: the views of z given to the outer factory, registration order;
        ``self._outer_map[f]``: (part, offset, numel, shape) of each of fragment f's outer parameters
        inside its parts, and ``self._outer_range[f]`` their indices in ``_outer_params``.
        """
        values, nparam = self._values(), len(self.flat.params)
        where = {}
        for g, group in enumerate(self.flat.params):
            off = 0
            for t in group.tensors:
                where[id(t)] = (g, off, t.numel(), tuple(t.shape))
                off += t.numel()
        units = [where[id(p)] for p in model.parameters() if id(p) in where]
        sizes = [n * values[g].element_size() for g, _, n, _ in units]
        bounds = split_fragments(sizes, self.fragments, where="SlowMo: fragments")
        buffers = [(g, 0, values[g].numel()) for g in range(nparam, len(values))]
        self._parts, self._outer_map, self._outer_range, self._nparam_parts = [], [], [], []
        for f in range(self.fragments):
            members = units[bounds[f] : bounds[f + 1]]
            if self.fragments == 1:
                parts = [(g, 0, values[g].numel()) for g in range(nparam)]
            else:
                groups = sorted({g for g, *_ in members})
                parts = [
                    (g, min(o for h, o, *_ in members if h == g), max(o + n for h, o, n, _ in members if h == g))
                    for g in groups
                ]
            index = {g: i for i, (g, _, _) in enumerate(parts)}
            self._nparam_parts.append(len(parts))
            self._parts.append(parts + (buffers if f == 0 else []))
            self._outer_map.append([(index[g], o - parts[index[g]][1], n, s) for g, o, n, s in members])
            self._outer_range.append((bounds[f], bounds[f + 1]))
        if not self.shard:
            self._outer_params = [self.slow[g][o : o + n].view(s) for g, o, n, s in units]
        else:  # one flat parameter: this rank's slice of group 0; other groups per tensor
            rest = [u for u in units if u[0] != 0]
            self._outer_params = [self.slow[0]] + [self.slow[g][o : o + n].view(s) for g, o, n, s in rest]
            self._outer_map = [[(0, 0, self.slow[0].numel(), (self.slow[0].numel(),))] + rest]
            self._outer_range = [(0, len(self._outer_params))]

    def _part(self, tensors: list[torch.Tensor], f: int) -> list[torch.Tensor]:
        """Fragment f's slices of per-group tensors (the model's values, z, u): the tensors themselves if F = 1."""
        if self.fragments == 1:
            return list(tensors)
        return [tensors[g][lo:hi] for g, lo, hi in self._parts[f]]

    @property
    def gamma(self) -> float:
        """The inner learning rate at the start of the current window (fragment 0's with fragments)."""
        return self._gammas[0]

    @gamma.setter
    def gamma(self, value: float) -> None:
        self._gammas[0] = float(value)

    def _update_slow(self, f: int, x_bar: list[torch.Tensor], gamma: float) -> None:
        """z <- the slow step from x_bar on fragment f (the rule, or the outer optimizer); x_bar is scratch."""
        zs = self._part(self.slow, f)
        nparam = self._nparam_parts[f]
        if self.outer is None:
            us = self._part(self.momentum, f)
            slow_momentum_update(
                zs[:nparam], us[:nparam], x_bar[:nparam], alpha=self.alpha, beta=self.beta, gamma=gamma
            )
            for z, x in zip(zs[nparam:], x_bar[nparam:]):
                z.copy_(x)  # model buffers (BatchNorm statistics): averaged, not stepped (a variance stays >= 0)
            return
        for i, (z, x) in enumerate(zip(zs, x_bar)):
            if i < nparam:
                torch.sub(z, x, out=x)  # the pseudo-gradient z - x_bar, in the scratch
            else:
                z.copy_(x)  # model buffers: averaged, not stepped
        grads = [x_bar[i][o : o + n].view(s) for i, o, n, s in self._outer_map[f]]
        lo, hi = self._outer_range[f]
        outer_step(self.outer, self._outer_params[lo:hi], grads, gamma=gamma if self.scale_by_gamma else None)

    def _average_workers_(self, values: list[torch.Tensor], f: int) -> None:
        """In place: fragment f's ``values`` (this worker's model) <- x_bar, the workers' exact average.

        The one place where a blocking, unsharded slow step averages the workers, and counts the bytes.
        A compressed sync goes here: every rank holds the same z, so averaging Delta_r = z - x_r
        (compressed, error feedback kept per fragment) and taking x_bar = z - average leaves the rest
        of the slow step as it is.
        """
        weight = float(self.flat.params[0].buffer[-1]) if self.push_sum else 1.0
        weight_sum = None if self.push_sum else self.comm.world_size
        if self._compress is None:
            exact_average_(values, weight, self.comm, weight_sum=weight_sum)
            self._count(values)
            return
        zs = self._part(self.slow, f)
        for v, z in zip(values, zs):
            torch.sub(z, v, out=v)  # Delta_r = z - x_r: every rank holds the same z
        sync = self._compress[f]
        sync.average_(values, weight, self.comm, weight_sum=weight_sum)
        for v, z in zip(values, zs):
            torch.sub(z, v, out=v)  # x_bar = z - the average of Delta_r
        self._slow_bytes += sync.bytes_sent

    def _count(self, sent: list[torch.Tensor]) -> None:
        # a ring all-reduce, or reduce-scatter + all-gather, sends 2 (p - 1) / p of each buffer
        p = self.comm.world_size
        self._slow_bytes += sum(2 * (p - 1) * v.numel() * v.element_size() // p for v in sent)

    # -- the step ---------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        for f, o in enumerate(self._offsets):
            if (self.step_count - o) % self.tau == 0 or self.step_count == 0:
                self._gammas[f] = self.base_lr()
        if self.base is not None and self.base.overlap:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self.flat.check_views(full=self.step_count % 100 == 0)
            self.base._advance()
        elif self.base is not None:
            loss = self.base.step(closure)
        else:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self.flat.check_views(full=self.step_count % 100 == 0)
            self.optimizer.step()
        self.step_count += 1
        if self._slow_avg is not None:
            self._apply_slow()
        f = fragment_due(self.step_count, self.tau, self._offsets)
        if f is not None:
            if self.overlap_slow:
                self._start_slow(f)
            else:
                self._slow_step(f)
        if self.base is not None and self.base.overlap:
            self.base._begin()
        return loss

    # -- the overlapped slow step ----------------------------------------------------
    def _start_slow(self, f: int = 0) -> None:
        """x_sent <- fragment f of x; start the all-reduce of the workers' average on its own channel."""
        values = self._part(self._values(), f)
        if f not in self._slow_scratch:
            self._slow_scratch[f] = ([torch.empty_like(v) for v in values], [torch.empty_like(v) for v in values])
        self._slow_sent, self._slow_red = self._slow_scratch[f]
        for sent, red, v in zip(self._slow_sent, self._slow_red, values):
            sent.copy_(v)
            red.copy_(v)
        weight = float(self.flat.params[0].buffer[-1]) if self.push_sum else 1.0
        weight_sum = None if self.push_sum else self.comm.world_size
        self._slow_avg = start_exact_average(self._slow_red, weight, self.comm, weight_sum=weight_sum, channel="slow")
        self._slow_ready = False
        self._slow_gamma, self._slow_frag = self._gammas[f], f

    def _apply_slow(self) -> None:
        """Wait for the average, take the slow step, x <- z + (x - x_sent) on the fragment sent."""
        if not self._slow_ready:
            self._slow_avg.finish()
        self._slow_avg, self._slow_ready = None, False
        f = self._slow_frag
        values = self._part(self._values(), f)
        self._count(values)
        self._update_slow(f, self._slow_red, self._slow_gamma)
        for v, sent, z in zip(values, self._slow_sent, self._part(self.slow, f)):
            v.sub_(sent).add_(z)
        if self.push_sum and self.fragments == 1:
            self.flat.params[0].buffer[-1] = 1.0
        self._buffers_at_slow_step()

    def _settle_slow(self) -> None:
        """Wait for an overlapped slow step's average and divide (its result stays pending)."""
        if self._slow_avg is not None and not self._slow_ready:
            self._slow_avg.finish()
            self._slow_ready = True

    def _slow_step(self, f: int = 0) -> None:
        """x_bar, then the slow step, then every worker <- z (fragment f); the model's own buffers are the scratch."""
        values = self._values()
        if self.shard:
            # x_bar: push-sum weights sum in one float64 all-reduce (the slot is not sharded); else the sum is W.
            weight = float(self.flat.params[0].buffer[-1]) if self.push_sum else 1.0
            weight_sum = None if self.push_sum else self.comm.world_size
            # reduce-scatter the first group, update this rank's chunk, all-gather it back.
            if self._pad is None:
                self._pad = torch.zeros(
                    self._chunk * self.comm.world_size, dtype=values[0].dtype, device=values[0].device
                )
                self._mine = torch.empty_like(self.slow[0])
            self._pad[: values[0].numel()].copy_(values[0])
            exact_average_([self._pad] + values[1:], weight, self.comm, weight_sum=weight_sum, shard_out=self._mine)
            x_bar = [self._mine] + values[1:]
            self._count(values)
        else:
            values = self._part(values, f)
            self._average_workers_(values, f)
            x_bar = values
        self._update_slow(f, x_bar, self._gammas[f])
        if self.shard:
            self.comm.all_gather_into(self._pad, self.slow[0])
            values[0].copy_(self._pad[: values[0].numel()])
        for i, (v, z) in enumerate(zip(values, self._part(self.slow, f))):
            if not (self.shard and i == 0):
                v.copy_(z)
        if self.push_sum and self.fragments == 1:
            self.flat.params[0].buffer[-1] = 1.0
        self._buffers_at_slow_step()

    def _buffers_at_slow_step(self) -> None:
        if self.optimizer_state == "keep":
            return
        if self.optimizer_state == "reset":
            self.optimizer.state.clear()
            return
        for p in [p for g in self.optimizer.param_groups for p in g["params"]]:
            for t in self.optimizer.state.get(p, {}).values():
                if torch.is_tensor(t) and t.is_floating_point() and t.dim() > 0:
                    exact_average_([t], 1.0, self.comm, weight_sum=self.comm.world_size)

    # -- checkpoints --------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a bitwise resume needs; waits for communication in flight.

        With overlap, save between steps (after ``step()``, before the next forward).
        """
        self._settle_slow()
        own = {
            STEP_KEY: self.step_count,
            "gamma": self.gamma,
            "slow": [z.clone() for z in self.slow],
            "momentum": [u.clone() for u in self.momentum],
            "tau": self.tau,
            "alpha": self.alpha,
            "beta": self.beta,
            "shard": self.shard,
            "world_size": self.comm.world_size,
        }
        if self.fragments > 1:
            own["fragments"], own["gammas"] = self.fragments, list(self._gammas)
        if self.outer is not None:
            own["outer"] = self.outer.state_dict()
        if self._compress is not None:
            own["compress"] = {"sync_dtype": self.sync_dtype, "syncs": [c.state_dict() for c in self._compress]}
        if self._slow_avg is not None:
            own["pending_slow"] = {
                "sent": [t.clone() for t in self._slow_sent],
                "x_bar": [t.clone() for t in self._slow_red],
                "gamma": self._slow_gamma,
            }
            if self.fragments > 1:
                own["pending_slow"]["fragment"] = self._slow_frag
        if self.base is not None:
            base = self.base.state_dict()
            return {"inner": base["inner"], "slowmo": own, "base": base["decentralized"]}
        return {
            "inner": self.optimizer.state_dict(),
            "slowmo": own,
            "model": [b.detach().clone() for b in self.flat.tensors()],
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        own = state_dict["slowmo"]
        if own["world_size"] != self.comm.world_size or own["shard"] != self.shard:
            raise ConfigError(
                f"SlowMo checkpoint: written with world size {own['world_size']} and shard={own['shard']}, "
                f"loading with world size {self.comm.world_size} and shard={self.shard}"
            )
        if own.get("fragments", 1) != self.fragments or ("outer" in own) != (self.outer is not None):
            raise ConfigError(
                f"SlowMo checkpoint: written with fragments={own.get('fragments', 1)} and "
                f"{'an' if 'outer' in own else 'no'} outer optimizer, loading with fragments={self.fragments} "
                f"and {'an' if self.outer is not None else 'no'} outer optimizer"
            )
        step_count = saved_step_count(own, "SlowMo.load_state_dict")
        if self.base is not None:
            self.base.load_state_dict({"inner": state_dict["inner"], "decentralized": state_dict["base"]})
        else:
            self.optimizer.load_state_dict(state_dict["inner"])
            for dst, src in zip(self.flat.tensors(), state_dict["model"]):
                dst.copy_(src)
        self.step_count = step_count
        self._gammas = [float(g) for g in own.get("gammas", [own["gamma"]])]
        if self.outer is not None:
            self.outer.load_state_dict(own["outer"])
        saved = own.get("compress", {}).get("sync_dtype", "float32")
        if saved != self.sync_dtype:
            raise ConfigError(
                f"SlowMo checkpoint: written with sync_dtype={saved!r}, loading with sync_dtype={self.sync_dtype!r}"
            )
        for sync, st in zip(self._compress or [], own.get("compress", {}).get("syncs", [])):
            sync.load_state_dict(st)
        self.tau, self.alpha, self.beta = own["tau"], own["alpha"], own["beta"]
        for dst, src in zip(self.slow + self.momentum, own["slow"] + own["momentum"]):
            dst.copy_(src)
        if self._slow_avg is not None:
            self._slow_avg.wait()
        self._slow_avg, self._slow_ready = None, False
        pending = own.get("pending_slow")
        if pending is not None:
            if not self.overlap_slow:
                raise ConfigError(
                    "SlowMo checkpoint: it was saved with an overlapped slow step in flight; load it with "
                    "overlap_slow=True"
                )
            self._slow_sent = [t.clone() for t in pending["sent"]]
            self._slow_red = [t.clone() for t in pending["x_bar"]]
            self._slow_gamma, self._slow_frag = float(pending["gamma"]), int(pending.get("fragment", 0))
            self._slow_avg, self._slow_ready = AverageInFlight(self._slow_red, None, False, None, None), True

    @torch.no_grad()
    def finalize(self) -> None:
        """Every worker <- the exact average of the workers (the model to evaluate and export).

        An overlapped slow step still pending is applied first.
        """
        if self._slow_avg is not None:
            self._apply_slow()
        if self.base is not None:
            self.base.finalize()  # push-sum aware: sum of numerators / sum of weights
            return
        exact_average_(self._values(), 1.0, self.comm, weight_sum=self.comm.world_size)

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank has sent: the base algorithm's gossip plus the slow steps' collectives."""
        return (self.base.bytes_sent if self.base is not None else 0) + self._slow_bytes

    def __repr__(self) -> str:
        base = self.base.topology.name if self.base is not None else "local"
        return (
            f"SlowMo(tau={self.tau}, alpha={self.alpha}, beta={self.beta}, base={base}, shard={self.shard}, "
            f"overlap={self.overlap}, overlap_slow={self.overlap_slow}, fragments={self.fragments}, "
            f"outer={type(self.outer).__name__ if self.outer is not None else None}, sync_dtype={self.sync_dtype})"
        )
