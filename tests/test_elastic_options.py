"""``elastic=True`` on the wrappers: what elastic membership cannot run is refused at construction, by name.

One process, a world of one rank (no process is started).
"""

from __future__ import annotations

import pytest
import torch

import lookahead_dist
from lookahead_dist.decentralized import Decentralized
from lookahead_dist.errors import CommError, ConfigError, MembershipError
from lookahead_dist.regroup import _check_wrapper
from lookahead_dist.slowmo import SlowMo
from lookahead_dist.testing.local_placement import one_rank_group


def model_and_opt():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def outer(params):
    return torch.optim.SGD(params, lr=0.7, momentum=0.9, nesterov=True)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(shard=True), r"SlowMo\(elastic=True\): shard=True is not supported with elastic membership"),
        (dict(overlap_slow=True), r"SlowMo\(elastic=True\): overlap_slow=True is not supported"),
        (dict(overlap=True, base="topologies/ring.yaml"), r"SlowMo\(elastic=True\): overlap=True"),
    ],
)
def test_slowmo_refuses_what_elastic_membership_cannot_run(kw, match):
    with one_rank_group("gloo"):
        model, opt = model_and_opt()
        with pytest.raises(ConfigError, match=match):
            SlowMo(opt, model, elastic=True, **kw)


def test_slowmo_runs_outer_fragments_and_a_compressed_sync_under_elastic():
    with one_rank_group("gloo"):
        model, opt = model_and_opt()
        s = SlowMo(opt, model, tau=4, outer=outer, fragments=2, sync_dtype="float32", elastic=True)
        assert s.elastic and s.outer is not None and s.fragments == 2
        for dtype in ("int8", "bfloat16"):
            assert SlowMo(opt, model, tau=4, outer=outer, sync_dtype=dtype, elastic=True).sync_dtype == dtype
        _check_wrapper(s, 1)  # what Elastic checks of a wrapper built without the flag is the same check
        plain = SlowMo(opt, model, tau=4, base="topologies/ring.yaml", elastic=True)
        assert plain.elastic and plain.base.elastic
        assert not SlowMo(opt, model).elastic


def test_decentralized_refuses_overlap_and_slow_agents():
    with one_rank_group("gloo"):
        model, opt = model_and_opt()
        with pytest.raises(ConfigError, match=r"Decentralized\(elastic=True\): overlap=True is not supported"):
            Decentralized(opt, model, "topologies/ring.yaml", overlap=True, elastic=True)
        two = {
            "generator": {"type": "two_agent", "alpha": 0.5, "tau": 2},
            "roles": ["fast", "slow"],
            "placement": [0, 0],
        }
        with pytest.raises(ConfigError, match=r"one fast agent per rank and no slow agents \(got 2 agents on 1"):
            Decentralized(opt, model, two, elastic=True)
        assert Decentralized(opt, model, "topologies/ring.yaml", elastic=True).elastic


def test_elastic_refuses_a_wrapper_built_without_the_flag_the_same_way():
    with one_rank_group("gloo"):
        model, opt = model_and_opt()
        with pytest.raises(ConfigError, match=r"Elastic: SlowMo\(elastic=True\): shard=True"):
            _check_wrapper(SlowMo(opt, model, shard=True), 1)
        with pytest.raises(ConfigError, match="make_opt must return a Decentralized or SlowMo"):
            _check_wrapper(opt, 1)


def test_the_package_exports_the_elastic_api():
    assert lookahead_dist.Elastic.__name__ == "Elastic" and lookahead_dist.Membership.__name__ == "Membership"
    assert issubclass(MembershipError, CommError) and lookahead_dist.MembershipError is MembershipError
