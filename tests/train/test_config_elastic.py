"""The ``elastic:`` section of the run config: typed, checked, and refused with what elastic cannot run."""

from __future__ import annotations

import pytest

from lookahead_dist.errors import ConfigError
from lookahead_dist.train.config import load_config, to_dict


def test_defaults_keep_elastic_off():
    cfg = load_config()
    assert not cfg.elastic.enabled
    assert to_dict(cfg)["elastic"] == dict(
        enabled=False, heartbeat=0.5, dead_after=10.0, timeout=60.0, history=None, sync_every=None
    )


def test_elastic_keys_are_typed(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("elastic: {enabled: true, heartbeat: 0.25, dead_after: 2, timeout: 30, history: 8}\n")
    e = load_config(path).elastic
    assert (e.enabled, e.heartbeat, e.dead_after, e.timeout, e.history, e.sync_every) == (
        True,
        0.25,
        2.0,
        30.0,
        8,
        None,
    )
    with pytest.raises(ConfigError, match=r"run.yaml: unknown key 'elastic.restarts'"):
        path.write_text("elastic: {restarts: 3}\n")
        load_config(path)
    with pytest.raises(ConfigError, match=r"elastic.enabled: expected true or false, got 'maybe'"):
        load_config(None, ["elastic.enabled=maybe"])


@pytest.mark.parametrize(
    "sets, match",
    [
        (["elastic.heartbeat=0"], "elastic.heartbeat must be a positive number of seconds, got 0"),
        (["elastic.dead_after=0.5"], r"elastic.dead_after must be at least twice elastic.heartbeat \(0.5\)"),
        (["elastic.history=0"], "elastic.history must be an integer >= 1, got 0"),
        (["elastic.sync_every=-2"], "elastic.sync_every must be an integer >= 1, got -2"),
    ],
)
def test_bad_elastic_values_name_their_key(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, sets)


@pytest.mark.parametrize(
    "sets, match",
    [
        (["algorithm.shard=true"], r"algorithm.shard \(True\) cannot be combined with elastic.enabled: true"),
        (["algorithm.overlap_slow=true"], r"algorithm.overlap_slow \(True\) cannot be combined with elastic"),
        (["algorithm.overlap=true"], r"algorithm.overlap \(True\) cannot be combined with elastic.enabled"),
        (["algorithm.name=allreduce"], "algorithm.name cannot run with elastic.enabled: true"),
        (["algorithm.name=lookahead"], "algorithm.name cannot run with elastic.enabled: true"),
    ],
)
def test_what_elastic_cannot_run_is_refused_naming_both_keys(sets, match):
    load_config(None, sets)  # fine without elastic
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["elastic.enabled=true", *sets])


@pytest.mark.parametrize("name", ["slowmo", "diloco", "decentralized", "local_sgd"])
def test_the_elastic_algorithms_load(name):
    cfg = load_config(None, ["elastic.enabled=true", f"algorithm.name={name}", "algorithm.fragments=2"][
        : 3 if name in ("diloco", "local_sgd") else 2
    ])  # fmt: skip
    assert cfg.elastic.enabled and cfg.algorithm.name == name
