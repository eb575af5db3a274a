"""Decentralized training as an optimizer wrapper: base step on the fast agent, then X <- X P_k.

:class:`Decentralized` wraps any torch.optim optimizer on every rank. Which
algorithm runs is decided only by the topology: a gossip graph gives D-PSGD, a
push-sum file gives Stochastic Gradient Push, identity phases with a periodic
exact average give local SGD, the two-agent file gives Lookahead with the slow
model on its own rank. Nothing here knows those names.

One step on rank r (k counts optimizer steps from 0)::

    x_r   <- base optimizer step on x_r          (only if a fast agent lives here)
    X     <- X P_k                                (engine: all-reduce / exchange / local)

With push-sum the model holds the de-biased z = x / w between steps: the
gradient is taken at z, the base update is subtracted from the numerator
x = z w, the numerators and weights are mixed, and z = x / w is restored.

**Overlap** (``overlap=True``): combine-then-adapt, X_{k+1} = X_k P_k - G_k,
with the exchange of x_k in flight while the user's forward and backward at
x_k run::

    end of step k-1 (or the constructor, for x_0): snapshot x_k, start P_k's exchange
    step k:  wait; x_r <- sum_i P_k[i, r] snapshot_i; base optimizer step on x_r
             with the gradient taken at x_k; snapshot x_{k+1}, start P_{k+1}'s exchange

The base optimizer reads the combined point (weight decay sees it), as the
reference engine's ``order="combine_then_adapt"`` does. With push-sum the
numerators (z w, with the weight in their trailing slot) are sent from the
snapshot, the update is subtracted from the combined numerator and the model
is de-biased afterwards. Module buffers that forward changes in place
(BatchNorm statistics) are sent from the snapshot too, and what forward did to
them meanwhile is added back after the combine (x <- mix(x_sent) + (x_now -
x_sent)), so their local updates are not lost. Changing the parameters in place
while their exchange is in flight raises :class:`~lookahead_dist.errors.InFlightError`
at the next step (the version counters of the flat buffers and of each parameter
are compared; ``p.data`` bypasses them, so use ``torch.no_grad()`` and in-place
ops on the parameters themselves, or do not change them between steps).
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from lookahead_dist.comm import Comm
from lookahead_dist.engine import MixInFlight, MixingEngine, exact_average_
from lookahead_dist.errors import ConfigError, InFlightError
from lookahead_dist.flat import flatten_module, without_weight
from lookahead_dist.optim_utils import STEP_KEY, WrapperOptimizer, saved_step_count

__all__ = ["Decentralized", "check_elastic", "run_passive"]


def check_elastic(where: str, topology, world_size: int, **options) -> None:
    """Refuse what elastic membership cannot run: an option in ``options`` that is set, or a topology with slow
    agents or other than one fast agent per rank (:class:`~lookahead_dist.regroup.Elastic` re-plans one agent
    per survivor and restarts from per-step copies of the state, which in-flight or sharded state would break)."""
    for name, value in options.items():
        if value:
            raise ConfigError(
                f"{where}(elastic=True): {name}={value!r} is not supported with elastic membership (the state it "
                "keeps depends on communication in flight or on the world size); leave it at its default"
            )
    if topology is not None and (topology.slow_agents or topology.n != world_size):
        raise ConfigError(
            f"{where}(elastic=True): {topology.source}: elastic membership needs one fast agent per rank and no "
            f"slow agents (got {topology.n} agents on {world_size} ranks, slow {list(topology.slow_agents)})"
        )


def _load_topology(topology, world_size: int):
    from lookahead_dist import topology as topo_mod

    if isinstance(topology, topo_mod.Topology):
        return topology
    if isinstance(topology, (str, os.PathLike, dict)):
        return topo_mod.load(topology, world_size=world_size)
    raise ConfigError(f"topology: expected a Topology, a YAML path or a mapping, got {type(topology).__name__}")


class Decentralized(WrapperOptimizer):
    """Run ``optimizer`` on this rank's fast agent and mix every agent with the topology's schedule.

    Args:
        optimizer: the base optimizer over ``model``'s parameters (any torch.optim optimizer).
        model: this rank's model. Its parameters (and floating buffers) are re-homed into one flat
            buffer per dtype/device, the tensors stay the same objects.
        topology: a :class:`~lookahead_dist.topology.Topology`, a YAML file or a mapping.
        comm: the process group wrapper (default: a new :class:`Comm` on the default group).
        mix_buffers: mix model buffers (BatchNorm statistics) with the parameters (default) or keep them local.
        check: compare the schedule hash across ranks before training.
        overlap: mix in combine-then-adapt order with the exchange of x_k running behind
            the forward and backward at x_k (see the module docstring).
        elastic: check that this wrapper can run under elastic membership (one fast agent per rank, no
            slow agents, no overlap) and record it; :class:`~lookahead_dist.regroup.Elastic` runs it,
            rebuilding it for each generation of members (see docs/ELASTIC.md).

    At most one fast agent may live on a rank here (several agents per rank: use
    :class:`~lookahead_dist.engine.MixingEngine` directly). Slow agents on this rank
    start as copies of the model. A rank with no fast agent is passive: its model
    is its (first) slow agent, and its ``step()`` takes no base step and only
    mixes (see :func:`run_passive`).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: torch.nn.Module,
        topology,
        *,
        comm: Comm | None = None,
        mix_buffers: bool = True,
        check: bool = True,
        overlap: bool = False,
        elastic: bool = False,
    ):
        super().__init__(optimizer)
        self.comm = comm or Comm()
        self.topology = _load_topology(topology, self.comm.world_size)
        topo = self.topology
        self.elastic = bool(elastic)
        if self.elastic:
            check_elastic("Decentralized", topo, self.comm.world_size, overlap=overlap)
        self.engine = MixingEngine(topo.schedule, topo.placement, self.comm, source=topo.source, check=check)
        rank = self.comm.rank
        local = topo.agents_on(rank)
        fast = [a for a in local if topo.roles[a] == "fast"]
        if len(fast) > 1:
            raise ConfigError(
                f"{topo.source}: rank {rank} hosts fast agents {fast}; Decentralized drives one model per rank "
                "(use MixingEngine with one model per agent for several fast agents on a rank)"
            )
        self.fast_agent = fast[0] if fast else None
        self.push_sum = topo.push_sum
        self.model = model
        self.mix_buffers = bool(mix_buffers)
        self.flat = flatten_module(model, buffers=self.mix_buffers, weight_slot=self.push_sum)
        buffers = self.flat.tensors()
        # The model is this rank's fast agent, or on a passive rank its first slow agent.
        self._model_agent = self.fast_agent if self.fast_agent is not None else local[0]
        for agent in local:
            self.engine.add_agent(
                agent, buffers if agent == self._model_agent else [b.detach().clone() for b in buffers]
            )
        self.step_count = 0
        self.overlap = bool(overlap)
        self._inflight: MixInFlight | None = None
        if self.overlap:
            self._snapshots = {a: [torch.empty_like(b) for b in bufs] for a, bufs in self.engine.agents.items()}
            # module buffers (after the parameter groups): what forward changes while the exchange runs
            self._module_buffers = self.flat.tensors()[len(self.flat.params) :]
            self._sent_buffers = [torch.empty_like(b) for b in self._module_buffers]
            self._versions: list[int] = []
            self._begin()

    # -- push-sum bookkeeping ----------------------------------------------------
    def _values(self, agent: int) -> list[torch.Tensor]:
        """The agent's buffers without the push-sum weight slot."""
        return without_weight(self.engine.agents[agent], self.push_sum)

    def _weight(self, agent: int) -> torch.Tensor:
        return self.engine.agents[agent][0][-1]

    def _scale(self, agent: int, to_numerator: bool) -> None:
        w = float(self._weight(agent))
        if w == 1.0:
            return
        for v in self._values(agent):
            v.mul_(w) if to_numerator else v.div_(w)

    @property
    def weight(self) -> float:
        """This rank's model's push-sum weight (1.0 without push-sum)."""
        return float(self._weight(self._model_agent)) if self.push_sum else 1.0

    # -- the step ----------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.flat.check_views(full=self.step_count % 100 == 0)
        if self.overlap:
            self._advance()
            self._begin()
            return loss
        local = self.engine.local_agents
        if self.push_sum:
            for a in local:
                self._scale(a, to_numerator=True)
        if self.fast_agent is not None:
            self.optimizer.step()
        self.engine.mix(self.step_count)
        if self.push_sum:
            for a in local:
                self._scale(a, to_numerator=False)
        self.step_count += 1
        return loss

    # -- overlap -----------------------------------------------------------------
    def _param_versions(self) -> list[int]:
        """The version counters of the flat parameter buffers and of each parameter (a Parameter re-homed
        by ``.data =`` keeps a counter of its own, so an in-place op on it bumps only that one)."""
        return [g.buffer._version for g in self.flat.params] + [t._version for g in self.flat.params for t in g.tensors]

    @torch.no_grad()
    def _begin(self) -> None:
        """Snapshot every local agent (numerators with push-sum) and start mixing step ``step_count``."""
        k = self.step_count
        if self.engine.plan(k).is_noop:
            self._inflight = MixInFlight(k, self.engine.plan(k), {}, None)
            return
        for a, bufs in self.engine.agents.items():
            snap = self._snapshots[a]
            w = float(bufs[0][-1]) if self.push_sum else 1.0
            for dst, src in zip(snap, bufs):
                if w == 1.0:
                    dst.copy_(src)
                else:
                    torch.mul(src, w, out=dst)
            if self.push_sum:
                snap[0][-1] = w
        for dst, src in zip(self._sent_buffers, self._module_buffers):
            dst.copy_(src)
        self._versions = self._param_versions()
        self._inflight = self.engine.start(k, self._snapshots)

    @torch.no_grad()
    def _advance(self) -> None:
        """Step ``step_count`` of combine-then-adapt: wait, combine, base step; no new exchange is started."""
        if self._inflight is None:  # after finalize() or a load: start (and at once end) this step's exchange
            self._begin()
        inflight, self._inflight = self._inflight, None
        if inflight.k != self.step_count:
            raise InFlightError(
                f"rank {self.comm.rank}: the exchange in flight belongs to step {inflight.k} but the optimizer "
                f"is at step {self.step_count}; do not change step_count while overlap is on"
            )
        if inflight.pending is None:  # P_k is the identity: nothing was sent
            if self.fast_agent is not None:
                self.optimizer.step()
            self.step_count += 1
            return
        now = self._param_versions()
        if now != self._versions:
            inflight.wait()  # leave no operation behind before raising
            self._inflight = None
            names = [f"flat {g.dtype} buffer" for g in self.flat.params] + [
                n for g in self.flat.params for n in g.names
            ]
            changed = [n for n, a, b in zip(names, self._versions, now) if a != b]
            raise InFlightError(
                f"rank {self.comm.rank}: the model's parameters were changed in place while their exchange for "
                f"step {inflight.k} was in flight ({', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}); "
                "with overlap=True change the parameters only through the optimizer's step(), or call "
                "finalize() first and step() again afterwards"
            )
        # what forward did to the module buffers since they were sent, kept in the sent copies
        for sent, cur in zip(self._sent_buffers, self._module_buffers):
            torch.sub(cur, sent, out=sent)
        self.engine.finish(inflight)
        if self._module_buffers:
            w = float(self._weight(self._model_agent)) if self.push_sum else 1.0
            for cur, delta in zip(self._module_buffers, self._sent_buffers):
                cur.add_(delta, alpha=w)  # the combined buffers are numerators with push-sum
        if self.fast_agent is not None:
            self.optimizer.step()
        if self.push_sum:
            for a in self.engine.local_agents:
                self._scale(a, to_numerator=False)
        self.step_count += 1

    def wait(self) -> None:
        """Wait for the exchange in flight (its result is combined at the next step)."""
        if self._inflight is not None and self._inflight.pending is not None:
            self._inflight.wait()

    def _drop_in_flight(self) -> None:
        """Wait for the exchange in flight and forget it (the model is about to be replaced)."""
        self.wait()
        self._inflight = None

    @torch.no_grad()
    def finalize(self) -> None:
        """Every rank's model <- the exact average of the fast agents (push-sum: sum x / sum w).

        The model to evaluate and export. Push-sum weights are reset to 1.
        """
        if self.overlap:
            self._drop_in_flight()  # x_K's exchange is not needed: every rank takes the exact average of x_K
        # A rank without a fast agent (passive) has weight 0: it adds nothing and receives the average.
        weight = 0.0 if self.fast_agent is None else self.weight
        model_bufs = self.engine.agents[self._model_agent]
        if self.push_sum:
            exact_average_(model_bufs, weight, self.comm, weight_slot=True)
            model_bufs[0][-1] = 1.0
        else:  # the weights are 1 per fast agent, one fast agent per rank at most
            exact_average_(model_bufs, weight, self.comm, weight_sum=len(self.topology.fast_agents))

    def state_dict(self) -> dict:
        """The base optimizer's state, the step counter and every local agent; waits for an exchange in flight.

        With overlap, save between steps (after ``step()``, before the next forward):
        the checkpoint holds x_k, and loading it starts x_k's exchange again.
        """
        self.wait()
        return {
            "inner": self.optimizer.state_dict(),
            "decentralized": {
                STEP_KEY: self.step_count,
                "agents": {a: [b.detach().clone() for b in bufs] for a, bufs in self.engine.agents.items()},
                "fingerprint": self.topology.fingerprint(),
            },
        }

    def load_state_dict(self, state_dict: dict) -> None:
        own = state_dict["decentralized"]
        if own.get("fingerprint") != self.topology.fingerprint():
            raise ConfigError(f"checkpoint was written for another topology than {self.topology.source}")
        step_count = saved_step_count(own, "Decentralized.load_state_dict")
        if self.overlap:
            self._drop_in_flight()
        self.optimizer.load_state_dict(state_dict["inner"])
        self.step_count = step_count
        with torch.no_grad():
            for a, bufs in own["agents"].items():
                for dst, src in zip(self.engine.agents[int(a)], bufs):
                    dst.copy_(src)
        if self.overlap:
            self._begin()

    @property
    def bytes_sent(self) -> int:
        return self.engine.bytes_sent

    def __repr__(self) -> str:
        return (
            f"Decentralized({self.topology.name}, rank={self.comm.rank}, agent={self.fast_agent}, "
            f"push_sum={self.push_sum}, overlap={self.overlap}, inner={type(self.optimizer).__name__})"
        )


def run_passive(opt: Decentralized, steps: int) -> None:
    """The loop of a rank that hosts only slow agents: no data, no forward, no backward, only mixing.

    Run it for the same number of steps as the fast ranks.
    """
    if opt.fast_agent is not None:
        raise ConfigError(f"rank {opt.comm.rank} hosts fast agent {opt.fast_agent}; run_passive is for slow-only ranks")
    for _ in range(steps):
        opt.step()
