"""Checkpoints written by the code before the step counter got one name still resume, bit for bit.

tests/_data/old_*.pt were written by tests/_data/make_old_checkpoints.py on the commit before
(Decentralized and SlowMo saved their counter as "step", now "step_count"). Each is loaded into
fresh objects, trained K more steps and compared with an uninterrupted run of this code.
"""

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

from lookahead_dist.testing import local_placement

DATA = Path(__file__).resolve().parent / "_data"
K = 7  # steps after the checkpoint: crosses two more syncs (tau = 3)

_spec = importlib.util.spec_from_file_location("make_old_checkpoints", DATA / "make_old_checkpoints.py")
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)


@pytest.fixture(scope="module")
def one_rank_group():
    with local_placement.one_rank_group("gloo"):
        yield


def _close(opt):
    if hasattr(opt, "comm"):
        opt.comm.close()


def uninterrupted(kind):
    net = fixtures.model()
    opt = fixtures.build(kind, net)
    fixtures.train(net, opt, 0, fixtures.STOP + K)
    _close(opt)
    return [p.detach().clone() for p in net.parameters()], opt.state_dict()


@pytest.mark.parametrize("kind", fixtures.KINDS)
def test_old_checkpoint_resumes_bitwise(kind, one_rank_group):
    saved = torch.load(DATA / f"old_{kind}.pt", weights_only=True)
    net = fixtures.model()
    opt = fixtures.build(kind, net)
    net.load_state_dict(saved["model"])
    renamed = kind != "lookahead"  # Lookahead always wrote "step_count"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.load_state_dict(saved["optimizer"])
    deprecations = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert bool(deprecations) == renamed, deprecations
    assert all("'step'" in m for m in deprecations)
    assert opt.step_count == fixtures.STOP
    fixtures.train(net, opt, fixtures.STOP, fixtures.STOP + K)
    _close(opt)
    params, state = uninterrupted(kind)
    for p, q in zip(net.parameters(), params):
        assert torch.equal(p, q)
    assert opt.step_count == fixtures.STOP + K
    own = {"lookahead": "lookahead", "decentralized": "decentralized", "slowmo": "slowmo"}[kind]
    assert state[own]["step_count"] == fixtures.STOP + K and "step" not in state[own]  # one key, written anew


def test_the_former_counter_name_k_still_reads_and_writes(one_rank_group):
    net = fixtures.model()
    opt = fixtures.build("slowmo", net)
    fixtures.train(net, opt, 0, 2)
    with pytest.warns(DeprecationWarning, match="step_count"):
        assert opt.k == 2
    with pytest.warns(DeprecationWarning):
        opt.k = 3
    assert opt.step_count == 3
    _close(opt)
