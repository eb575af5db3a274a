"""What the trainer says at start, on rank 0 only (no process group: a stand-in comm)."""

import pytest

from lookahead_dist.train.config import REPO_ROOT, load_config
from lookahead_dist.train.trainer import _announce


class Ranks:
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size


def test_lookahead_on_several_ranks_says_it_runs_slowmo_with_beta_0_over_ddp(capsys):
    cfg = load_config(REPO_ROOT / "launch" / "configs" / "digits_lookahead.yaml")
    _announce(cfg, Ranks(0, 4))
    out = capsys.readouterr().out
    assert "algorithm lookahead on 4 ranks runs as SlowMo with beta 0 over DistributedDataParallel" in out
    assert "tau=5" in out and "alpha=0.5" in out
    for rank, world in ((1, 4), (0, 1)):  # another rank, or one process (serial Lookahead): nothing to say
        _announce(cfg, Ranks(rank, world))
        assert capsys.readouterr().out == ""


def test_old_spellings_are_repeated_at_start_on_rank_0(capsys):
    with pytest.warns(DeprecationWarning):
        cfg = load_config(None, ["algorithm.name=gossip", "algorithm.buffers=reset"])
    _announce(cfg, Ranks(1, 2))
    assert capsys.readouterr().out == ""
    _announce(cfg, Ranks(0, 2))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith("[train] deprecated: --set") for line in lines)
    assert "use 'algorithm.optimizer_state'" in lines[0] and "use algorithm.name: decentralized" in lines[1]
