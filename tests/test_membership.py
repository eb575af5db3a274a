"""Elastic membership in one process: agreement through a real store (threads as members), re-planning, bounds.

The spawned runs with killed processes are in tests/elastic/.
"""

from __future__ import annotations

import threading
import time

import pytest

from lookahead_dist.errors import ConfigError, TopologyError
from lookahead_dist.membership import ROOT, Membership, View, connect_store, dead_key
from lookahead_dist.regroup import Elastic, max_lead, replan


@pytest.fixture
def store():
    return connect_store("127.0.0.1", 0, 10.0, is_master=True)


def members(store, ids, world, **kw):
    kw = dict(heartbeat=0.02, dead_after=1.0, timeout=10.0) | kw
    out = [Membership(connect_store("127.0.0.1", store.port, 10.0), m, world, **kw) for m in ids]
    for ms in out:
        ms.view = View(0, tuple(range(world)), (0,) * world)
    return out


def agree_all(mss, steps, reason="failure"):
    views = {}

    def go(ms, step):
        views[ms.member] = ms._agree(ms.view, step, step - 1, reason)

    threads = [threading.Thread(target=go, args=(ms, s)) for ms, s in zip(mss, steps)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    for ms in mss:
        ms._beat.stop_event.set()
    return views


def test_two_silent_deaths_give_every_survivor_the_same_generation(store):
    mss = members(store, [0, 1, 3], 5)  # 2 and 4 never beat: dead after dead_after
    start = time.monotonic()
    views = agree_all(mss, [7, 6, 8])
    assert time.monotonic() - start >= 1.0
    assert len(set(views.values())) == 1
    (v,) = set(views.values())
    assert v.generation == 1 and v.members == (0, 1, 3) and v.lost == (2, 4) and v.step == 6
    assert v.rank_of(3) == 2 and v.world_size == 3 and v.reason == "failure"
    assert store.get(f"{ROOT}/gen/1/members") == v.to_json().encode()


def test_a_death_written_by_the_launcher_needs_no_heartbeat_timeout(store):
    mss = members(store, [0, 1], 3, dead_after=30.0)
    store.set(dead_key(2, 0, root=True), "-9")
    start = time.monotonic()
    views = agree_all(mss, [4, 4])
    assert time.monotonic() - start < 5.0
    assert {v.members for v in views.values()} == {(0, 1)}


def test_the_first_proposal_wins_and_a_late_view_is_read_not_rewritten(store):
    mss = members(store, [0, 1], 2)
    taken = View(1, (1,), (0,), step=3, lost=(0,))
    store.compare_set(f"{ROOT}/gen/1/members", "", taken.to_json())
    views = agree_all(mss, [5, 5])
    assert set(views.values()) == {taken}


def test_a_join_request_is_taken_by_the_next_generation(store):
    mss = members(store, [0, 1], 3)
    store.set(dead_key(2, 0, root=True), "-9")
    views = agree_all(mss, [2, 2])
    for ms in mss:
        ms.view = views[ms.member]
    assert not mss[0].pending_joins()
    store.append(f"{ROOT}/joins", "2.1,")
    store.get(f"{ROOT}/joins")  # the append is not acknowledged; a read on its connection waits until it is applied
    assert mss[0].pending_joins() and mss[1].pending_joins()
    for ms in mss:
        ms._beat = type(ms._beat)(ms.store, ms._alive_key(ms.member, 0), 0.02)
        ms._beat.start()
    views = agree_all(mss, [6, 6], reason="join")
    (v,) = set(views.values())
    assert v.members == (0, 1, 2) and v.incarnations == (0, 0, 1) and v.joined == (2,) and v.reason == "join"
    assert v.joins_seen == 1 and v.step == 6


def test_view_round_trips_through_json():
    v = View(3, (0, 2, 5), (0, 1, 0), step=9, joined=(2,), lost=(4,), reason="join", joins_seen=2)
    assert View.from_json(v.to_json()) == v


def test_membership_arguments_are_checked(store):
    for kw, word in [
        (dict(heartbeat=0), "heartbeat"),
        (dict(dead_after=0.1, heartbeat=0.5), "dead_after"),
        (dict(timeout=-1), "timeout"),
    ]:
        with pytest.raises(ConfigError, match=word):
            Membership(store, 0, 2, **kw)
    with pytest.raises(ConfigError, match="member"):
        Membership(store, 2, 2)


def test_from_env_names_what_is_missing(monkeypatch):
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError, match="lookahead_dist.elastic"):
        Membership.from_env()


@pytest.mark.parametrize(
    "spec,n,period",
    [("ring", 7, 1), ("one_peer_exponential", 6, 3), ("exponential", 5, 1), ("complete", 3, 1)],
)
def test_builtin_generators_are_generated_again_for_the_survivors(spec, n, period):
    t = replan(spec, n)
    assert t.n == n and t.world_size == n and t.schedule.period == period


def test_sizes_in_a_mapping_are_refilled_and_hierarchical_drops_a_whole_node():
    assert replan({"generator": {"type": "ring", "n": 8}, "agents": 8}, 6).n == 6
    t = replan({"generator": {"type": "hierarchical", "nodes": 3, "per_node": 2}}, 4)
    assert t.n == 4
    with pytest.raises(TopologyError, match="per_node"):
        replan({"generator": {"type": "hierarchical", "nodes": 3, "per_node": 2}}, 5)
    sched = {"schedule": [{"generator": "ring", "repeat": 2}, {"generator": "complete"}]}
    assert replan(sched, 5).schedule.period == 3


@pytest.mark.parametrize(
    "mapping,why",
    [
        ({"edges": [[0, 1], [1, 0]]}, "'edges'"),
        ({"matrix": [[0.5, 0.5], [0.5, 0.5]]}, "'matrix'"),
        ({"generator": "two_agent"}, "two_agent"),
        ({"generator": "ring", "roles": ["fast", "slow", "fast"]}, "slow agents"),
        ({"generator": "ring", "placement": [1, 0]}, "placement"),
        ({"schedule": [{"generator": "ring"}, {"matrix": [[1.0]]}]}, r"schedule\[1\]"),
    ],
)
def test_a_topology_that_fixes_its_size_cannot_be_re_planned(mapping, why):
    with pytest.raises(TopologyError, match=f"cannot be re-planned for 3 ranks.*{why}"):
        replan(mapping, 3)


def test_a_yaml_file_is_named_when_it_cannot_be_re_planned(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("edges: [[0, 1], [1, 2]]\n")
    with pytest.raises(TopologyError, match="mine.yaml: cannot be re-planned"):
        replan(str(path), 2)
    path.write_text("generator: ring\n")
    assert replan(str(path), 5).name == "mine"


def test_max_lead_is_the_depth_a_death_needs_to_reach_everyone():
    assert max_lead(replan("ring", 8)) == 4  # one hop each way per step
    assert max_lead(replan("complete", 8)) == 1
    assert max_lead(replan("one_peer_exponential", 8)) == 3  # log2(8) phases
    assert max_lead(replan("ring", 8), tau=2) == 2
    assert max_lead(None) == 1


def test_elastic_checks_its_arguments():
    with pytest.raises(ConfigError, match="make_opt"):
        Elastic(None, membership=object())
    with pytest.raises(ConfigError, match="history"):
        Elastic(lambda c, t: None, history=0, membership=object())


def test_launcher_flags_follow_torchrun():
    from lookahead_dist.elastic import parse_args

    a = parse_args(["--nproc_per_node=4", "--nnodes=2", "--node_rank=1", "--rdzv_endpoint=h:123", "t.py", "--x"])
    assert (a.nproc_per_node, a.nnodes, a.node_rank, a.master_addr, a.master_port) == (4, 2, 1, "h", 123)
    assert a.script == "t.py" and a.script_args == ["--x"]
    a = parse_args(["--standalone", "--nproc-per-node", "3", "--max-restarts", "2", "t.py"])
    assert (a.master_port, a.max_restarts, a.nnodes) == (0, 2, 1)
    with pytest.raises(SystemExit):
        parse_args(["--nnodes=1:4", "t.py"])
    with pytest.raises(SystemExit):
        parse_args(["--nnodes=2", "--node_rank=2", "t.py"])
