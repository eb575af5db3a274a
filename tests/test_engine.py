"""MixingEngine in one process, against a fake comm that records every call (no process spawned).

Every rank's engine lives in this process, each with a :class:`RecordingComm`.
The comms of one :class:`FakeWorld` hand buffers to each other through shared
dicts: an exchange posts copies of the sent buffers into per-pair mailboxes
(first in, first out, as gloo matches the messages of one pair) and takes the
received ones from them; an all-reduce waits for every member's contribution
and sums them in rank order. Ranks run their ``mix`` calls in threads, one per
rank, since a collective waits for the others. The mixed values are compared
with X P computed directly with the matrix.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from lookahead_dist.engine import MixingEngine
from lookahead_dist.errors import CommError, ConfigError
from lookahead_dist.mixing import Phase, Schedule
from lookahead_dist.plan import group_rank_sets
from lookahead_dist.topology import builtin, load

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"
WAIT_S = 20.0
SIZES = ((5, torch.float64), (3, torch.float32))  # two flat buffers per agent: two dtype groups


class FakeWorld:
    """The shared state of the ranks of one fake process group."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.cond = threading.Condition()
        self.mailbox: dict[tuple[int, int], list[torch.Tensor]] = defaultdict(list)  # (src, dst) -> buffers
        self.contrib: dict[tuple, dict[int, torch.Tensor]] = defaultdict(dict)  # collective -> rank -> buffer
        self.taken: dict[tuple, int] = defaultdict(int)
        self.comms = [RecordingComm(self, r) for r in range(world_size)]

    def wait_for(self, predicate, what: str) -> None:
        if not self.cond.wait_for(predicate, timeout=WAIT_S):
            raise TimeoutError(f"fake comm: gave up waiting for {what}")


class RecordingComm:
    """What MixingEngine needs of :class:`lookahead_dist.comm.Comm`, recording each call in ``calls``."""

    def __init__(self, world: FakeWorld, rank: int):
        self.world, self.rank, self.world_size = world, rank, world.world_size
        self.calls: list[tuple] = []
        self._seq: dict[tuple[int, ...], int] = defaultdict(int)

    def check_world_size(self, expected: int, source: str) -> None:
        self.calls.append(("check_world_size", expected))
        if expected != self.world_size:
            raise CommError(f"{source}: needs {expected} ranks, world size {self.world_size}")

    def check_same(self, value: str, what: str) -> None:
        self.calls.append(("check_same", value))

    def group(self, ranks):
        self.calls.append(("group", tuple(ranks)))
        return None

    def all_reduce_sum(self, tensor: torch.Tensor, ranks) -> None:
        ranks = tuple(ranks)
        assert self.rank in ranks, f"rank {self.rank} joined an all-reduce over {ranks}"
        self.calls.append(("all_reduce_sum", ranks, tensor.numel(), tensor.dtype))
        key = (ranks, self._seq[ranks])
        self._seq[ranks] += 1
        w = self.world
        with w.cond:
            w.contrib[key][self.rank] = tensor.clone()
            w.cond.notify_all()
            w.wait_for(lambda: len(w.contrib[key]) == len(ranks), f"all-reduce {key}")
            parts = w.contrib[key]
            total = parts[ranks[0]].clone()
            for r in ranks[1:]:
                total.add_(parts[r])
            w.taken[key] += 1
            if w.taken[key] == len(ranks):
                del w.contrib[key]
        tensor.copy_(total)

    def exchange(self, sends, recvs) -> None:
        self.calls.append(
            (
                "exchange",
                tuple((p, t.numel(), t.dtype) for p, t in sends),
                tuple((p, t.numel(), t.dtype) for p, t in recvs),
            )
        )
        w = self.world
        with w.cond:
            for peer, t in sends:
                assert peer != self.rank
                w.mailbox[(self.rank, peer)].append(t.clone())
            w.cond.notify_all()
        for peer, t in recvs:
            box = w.mailbox[(peer, self.rank)]
            with w.cond:
                w.wait_for(lambda box=box: len(box) > 0, f"a message from rank {peer} to rank {self.rank}")
                msg = box.pop(0)
            assert msg.shape == t.shape and msg.dtype == t.dtype, (msg.shape, t.shape)
            t.copy_(msg)

    def comm_calls(self) -> list[tuple]:
        return [c for c in self.calls if c[0] in ("all_reduce_sum", "exchange")]


def run_ranks(fn, world_size: int) -> None:
    """Run fn(rank) in one thread per rank; re-raise the first failure."""
    errors: list[BaseException] = []

    def target(r):
        try:
            fn(r)
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=2 * WAIT_S)
    assert not any(t.is_alive() for t in threads), "a rank is still running"
    if errors:
        raise errors[0]


class Agents:
    """Every agent's flat buffers, X0 as float64 columns, and one engine per rank."""

    def __init__(self, schedule: Schedule, placement, seed: int = 0, push_sum_weight: bool = False):
        self.schedule, self.placement = schedule, tuple(placement)
        self.world = FakeWorld(max(self.placement) + 1)
        self.engines = [MixingEngine(schedule, self.placement, c, source="test") for c in self.world.comms]
        gen = torch.Generator().manual_seed(seed)
        self.buffers = {}
        for i, r in enumerate(self.placement):
            bufs = [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for n, dtype in SIZES]
            if push_sum_weight:  # push-sum: the weight w = 1 rides as the last element of the first buffer
                bufs[0][-1] = 1.0
            self.buffers[i] = bufs
            self.engines[r].add_agent(i, bufs)
        self.X0 = [
            np.stack([self.buffers[i][g].double().numpy() for i in range(schedule.n)], axis=1)
            for g in range(len(SIZES))
        ]  # d x n per group

    def mix(self, steps) -> None:
        def one_rank(r):
            for k in steps:
                self.engines[r].mix(k)

        run_ranks(one_rank, self.world.world_size)

    def X(self, g: int) -> np.ndarray:
        return np.stack([self.buffers[i][g].double().numpy() for i in range(self.schedule.n)], axis=1)

    def assert_equals_product(self, steps) -> None:
        for g, (_, dtype) in enumerate(SIZES):
            want = self.X0[g]
            for k in steps:
                want = want @ self.schedule.matrix(k)
            tol = 1e-12 if dtype == torch.float64 else 1e-6
            err = np.max(np.abs(self.X(g) - want)) / max(1.0, np.max(np.abs(want)))
            assert err <= tol, f"group {g} ({dtype}): deviation {err:.3g} from X P"


def load_any(name: str, world_size: int = 4):
    path = TOPOLOGIES / name
    try:
        return load(path)
    except Exception:  # sized by the world size
        return load(path, world_size=world_size)


CASES = {
    "ring": (lambda: builtin("ring", world_size=4).schedule, (0, 1, 2, 3)),
    "ring_two_per_rank": (lambda: builtin("ring", world_size=4).schedule, (0, 0, 1, 1)),
    "complete": (lambda: builtin("complete", world_size=4).schedule, (0, 1, 2, 3)),
    "complete_two_per_rank": (lambda: builtin("complete", world_size=4).schedule, (0, 0, 1, 1)),
    "star": (lambda: builtin("star", world_size=5).schedule, (0, 1, 2, 3, 4)),
    "hierarchical": (lambda: builtin("hierarchical", nodes=2, per_node=2).schedule, (0, 1, 2, 3)),
    "hierarchical_node_per_rank": (lambda: builtin("hierarchical", nodes=2, per_node=2).schedule, (0, 0, 1, 1)),
    "directed_push_sum": (lambda: load_any("directed_push_sum.yaml").schedule, (0, 1, 2, 3)),
    "one_peer_exponential_push_sum": (
        lambda: Schedule(builtin("one_peer_exponential", world_size=4).schedule.phases, push_sum=True),
        (0, 1, 2, 3),
    ),
    "time_varying": (lambda: load_any("time_varying.yaml").schedule, (0, 1, 2, 3)),
    "time_varying_two_per_rank": (lambda: load_any("time_varying.yaml").schedule, (0, 1, 1, 0)),
    "two_agent_one_rank": (lambda: builtin("two_agent", alpha=0.3, tau=3).schedule, (0, 0)),
    "two_agent_two_ranks": (lambda: builtin("two_agent", alpha=0.3, tau=3).schedule, (0, 1)),
    "slow_agent_own_rank": (lambda: load_any("slow_agent_own_rank.yaml").schedule, (0, 1, 2, 3, 4)),
    "slow_agent_shared_rank": (lambda: load_any("slow_agent_own_rank.yaml").schedule, (0, 0, 1, 1, 1)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_mixing_equals_x_times_p_over_two_periods(name):
    make, placement = CASES[name]
    schedule = make()
    agents = Agents(schedule, placement, push_sum_weight=schedule.push_sum)
    steps = range(2 * schedule.period + 1)
    agents.mix(steps)
    agents.assert_equals_product(steps)
    if schedule.push_sum:  # the weights were mixed by the same row-stochastic P, which keeps their sum n
        assert abs(agents.X(0)[-1].sum() - schedule.n) <= 1e-12


@pytest.mark.parametrize("name", list(CASES))
def test_setup_calls_are_the_same_on_every_rank_and_in_schedule_order(name):
    make, placement = CASES[name]
    schedule = make()
    agents = Agents(schedule, placement)
    world = max(placement) + 1
    want_groups = [("group", g) for ph in schedule.phases for g in group_rank_sets(ph.matrix, placement)]
    for comm in agents.world.comms:
        assert comm.calls[0] == ("check_world_size", world)
        assert comm.calls[1][0] == "check_same" and comm.calls[1][1] == agents.world.comms[0].calls[1][1]
        assert comm.calls[2:] == want_groups


def test_ring_each_step_is_one_exchange_with_both_neighbours_per_dtype_group():
    agents = Agents(builtin("ring", world_size=4).schedule, (0, 1, 2, 3))
    agents.mix([0])
    for r, comm in enumerate(agents.world.comms):
        lo, hi = sorted(((r - 1) % 4, (r + 1) % 4))
        per_group = [((lo, n, dt), (hi, n, dt)) for n, dt in SIZES]
        sends = tuple(x for pair in per_group for x in pair)
        assert comm.comm_calls() == [("exchange", sends, sends)]
        # bytes_sent counts exactly the buffers handed to the exchange
        assert agents.engines[r].bytes_sent == 2 * sum(n * torch.empty(0, dtype=dt).element_size() for n, dt in SIZES)


def test_complete_is_one_all_reduce_per_dtype_group_and_no_exchange():
    agents = Agents(builtin("complete", world_size=4).schedule, (0, 1, 2, 3))
    agents.mix([0, 1])
    for comm in agents.world.comms:
        one_step = [("all_reduce_sum", (0, 1, 2, 3), n, dt) for n, dt in SIZES]
        assert comm.comm_calls() == one_step * 2


def test_hierarchical_node_per_rank_averages_locally_without_any_call_then_all_reduces_twice():
    agents = Agents(builtin("hierarchical", nodes=2, per_node=2).schedule, (0, 0, 1, 1))
    agents.mix([0])
    assert all(c.comm_calls() == [] for c in agents.world.comms)
    agents.mix([1])
    for comm in agents.world.comms:
        # components {0, 2} and {1, 3}: two all-reduces over ranks (0, 1), each once per dtype group
        assert comm.comm_calls() == [("all_reduce_sum", (0, 1), n, dt) for n, dt in SIZES] * 2


def test_directed_push_sum_sends_along_out_edges_only():
    agents = Agents(load_any("directed_push_sum.yaml").schedule, (0, 1, 2, 3), push_sum_weight=True)
    agents.mix([0])
    send_peers = {r: sorted({p for p, _, _ in c.comm_calls()[0][1]}) for r, c in enumerate(agents.world.comms)}
    recv_peers = {r: sorted({p for p, _, _ in c.comm_calls()[0][2]}) for r, c in enumerate(agents.world.comms)}
    assert send_peers == {0: [1, 2], 1: [2], 2: [3], 3: [0]}
    assert recv_peers == {0: [3], 1: [0], 2: [0, 1], 3: [2]}


def test_two_agents_on_one_rank_and_identity_steps_make_no_call():
    agents = Agents(builtin("two_agent", alpha=0.3, tau=3).schedule, (0, 0))
    agents.mix(range(6))
    assert agents.world.comms[0].comm_calls() == []
    agents.assert_equals_product(range(6))
    two = Agents(builtin("two_agent", alpha=0.3, tau=3).schedule, (0, 1))
    two.mix([0, 1])  # local steps: nothing moves
    assert all(c.comm_calls() == [] for c in two.world.comms)
    two.mix([2])
    assert all(c.comm_calls() == [("all_reduce_sum", (0, 1), n, dt) for n, dt in SIZES] for c in two.world.comms)


def test_the_matrix_of_each_step_is_the_one_of_its_phase():
    """A hand-made schedule whose phases are told apart by their result: swap, keep, average."""
    swap = np.array([[0.0, 1.0], [1.0, 0.0]])
    avg = np.full((2, 2), 0.5)
    schedule = Schedule([Phase(swap, 2), Phase(np.eye(2), 1), Phase(avg, 1)])
    agents = Agents(schedule, (0, 1))
    x0 = [agents.buffers[i][0].clone() for i in (0, 1)]
    agents.mix([0])
    assert torch.equal(agents.buffers[0][0], x0[1]) and torch.equal(agents.buffers[1][0], x0[0])
    agents.mix([1, 2])  # swap back, then keep
    assert torch.equal(agents.buffers[0][0], x0[0]) and torch.equal(agents.buffers[1][0], x0[1])
    agents.mix([3])
    assert torch.allclose(agents.buffers[0][0], (x0[0] + x0[1]) / 2, rtol=0, atol=1e-15)
    agents.mix([4])  # period 4: step 4 is a swap again
    agents.assert_equals_product(range(5))


# -- construction errors ------------------------------------------------------------------------------


def one_rank_comm(world_size: int = 1) -> RecordingComm:
    return FakeWorld(world_size).comms[0]


def test_placement_of_the_wrong_length_is_a_config_error():
    with pytest.raises(ConfigError, match="placement has 3 entries but the schedule has 4 agents"):
        MixingEngine(builtin("ring", world_size=4).schedule, (0, 1, 2), one_rank_comm(3), source="ring.yaml")


def test_world_size_is_checked_against_the_placement():
    with pytest.raises(CommError, match="needs 4 ranks"):
        MixingEngine(builtin("ring", world_size=4).schedule, (0, 1, 2, 3), one_rank_comm(2))


def test_check_false_skips_the_fingerprint_comparison():
    comm = one_rank_comm(2)
    MixingEngine(builtin("two_agent", alpha=0.5, tau=2).schedule, (0, 1), comm, check=False)
    assert [c[0] for c in comm.calls] == ["check_world_size", "group"]


def test_agents_must_be_local_alike_and_all_added_before_mixing():
    schedule = builtin("two_agent", alpha=0.5, tau=1).schedule
    engine = MixingEngine(schedule, (0, 1), one_rank_comm(2))
    with pytest.raises(ConfigError, match="agent 1 is placed on rank 1, not on this rank 0"):
        engine.add_agent(1, [torch.zeros(3)])
    local = MixingEngine(schedule, (0, 0), one_rank_comm(1))
    local.add_agent(0, [torch.zeros(3)])
    with pytest.raises(ConfigError, match="agent 1: its buffers"):
        local.add_agent(1, [torch.zeros(4)])
    with pytest.raises(ConfigError, match=r"agents \[1\] are placed here but were never added"):
        local.mix(0)
