"""Run configs (typed, strict), the learning-rate schedule, data sharding and the models; no processes spawned."""

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lookahead_dist.errors import ConfigError
from lookahead_dist.train.config import REPO_ROOT, Config, load_config, resolve_topology, to_dict, validate
from lookahead_dist.train.data import build_data, epoch_order, shard_indices
from lookahead_dist.train.models import DigitsCNN, build_model
from lookahead_dist.train.schedules import cosine, lr_at, step_decay

CONFIGS = REPO_ROOT / "launch" / "configs"


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_defaults_need_no_file_and_match_the_spelled_out_config():
    cfg = load_config(None, [])
    assert (cfg.algorithm.name, cfg.model.name, cfg.data.name, cfg.steps, cfg.epochs) == (
        "slowmo",
        "digits_cnn",
        "digits",
        400,
        None,
    )
    assert to_dict(load_config(CONFIGS / "digits_slowmo.yaml")) == to_dict(Config())


def test_default_topology_resolves_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = resolve_topology(load_config().algorithm.topology)
    assert path == REPO_ROOT / "topologies" / "ring.yaml"
    with pytest.raises(ConfigError, match=r"algorithm\.topology: no topology file 'nope\.yaml'"):
        resolve_topology("nope.yaml")


def test_unknown_key_in_file_names_file_and_key_path(tmp_path):
    p = write(tmp_path, "optim:\n  lr: 0.1\n  lrr: 0.2\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: unknown key 'optim\.lrr'"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"unknown key 'stepz'"):
        load_config(write(tmp_path, "stepz: 3\n"))


def test_unknown_key_in_override():
    with pytest.raises(ConfigError, match=r"--set algorithm\.taux=3: unknown key 'algorithm\.taux'"):
        load_config(None, ["algorithm.taux=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'nosuch'"):
        load_config(None, ["nosuch.lr=3"])
    with pytest.raises(ConfigError, match=r"expected key\.sub=value"):
        load_config(None, ["steps"])
    with pytest.raises(ConfigError, match=r"'optim' is a section"):
        load_config(None, ["optim=3"])


def test_wrong_types_in_file(tmp_path):
    cases = {
        "optim:\n  lr: fast\n": r"optim\.lr: expected a number, got 'fast'",
        "steps: 1.5\n": r"steps: expected an integer or null, got 1\.5",
        "algorithm:\n  shard: 1\n": r"algorithm\.shard: expected true or false, got 1",
        "optim:\n  milestones: 30\n": r"optim\.milestones: expected a list of a number, got 30",
        "optim:\n  milestones: [30, x]\n": r"optim\.milestones\[1\]: expected a number",
        "model: resnet50\n": r"model: expected a mapping",
        "batch_size: true\n": r"batch_size: expected an integer, got True",
    }
    for text, pattern in cases.items():
        with pytest.raises(ConfigError, match=pattern):
            load_config(write(tmp_path, text))


def test_wrong_types_in_override():
    with pytest.raises(ConfigError, match=r"--set steps=abc: steps: expected an integer or null, got 'abc'"):
        load_config(None, ["steps=abc"])
    with pytest.raises(ConfigError, match=r"optim\.nesterov: expected true or false"):
        load_config(None, ["optim.nesterov=maybe"])
    with pytest.raises(ConfigError, match=r"optim\.milestones: expected a list"):
        load_config(None, ["optim.milestones=7"])


def test_override_conversion_uses_the_field_type():
    cfg = load_config(
        None,
        [
            "steps=120",
            "optim.lr=1e-3",
            "optim.weight_decay=0",
            "algorithm.shard=true",
            "model.batch_norm=0",
            "optim.milestones=[10, 20.5]",
            "algorithm.topology=null",
            "name=123",
            "data.path=/x y/z",
            "optim.schedule=step",
            "timeout_s=60",
        ],
    )
    assert cfg.steps == 120 and cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 0.0
    assert isinstance(cfg.optim.weight_decay, float) and isinstance(cfg.timeout_s, float)
    assert cfg.algorithm.shard is True and cfg.model.batch_norm is False
    assert cfg.optim.milestones == [10.0, 20.5]
    assert cfg.algorithm.topology is None
    assert cfg.name == "123" and cfg.data.path == "/x y/z"  # strings stay verbatim
    assert cfg.source.startswith("--set steps=120")


def test_file_then_overrides(tmp_path):
    p = write(tmp_path, "optim:\n  lr: 0.3\nsteps: 10\n")
    cfg = load_config(p, ["optim.lr=0.2"])
    assert (cfg.optim.lr, cfg.steps, cfg.optim.momentum) == (0.2, 10, 0.9)


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("optim.lr=0", r"optim\.lr must be > 0"),
        ("optim.lr=-1", r"optim\.lr must be > 0"),
        ("batch_size=0", r"batch_size must be an integer >= 1, got 0"),
        ("algorithm.tau=0", r"algorithm\.tau must be an integer >= 1, got 0"),
        ("algorithm.optimizer_state=mix", r"algorithm\.optimizer_state must be one of \('keep', 'reset', 'average'\)"),
        ("eval_every=-1", r"eval_every must be an integer >= 0, got -1 \(0: only at the end\)"),
        ("algorithm.alpha=1.5", r"algorithm\.alpha must lie in \(0, 1\]"),
        ("algorithm.beta=1", r"algorithm\.beta must lie in \[0, 1\)"),
        ("algorithm.name=sgp", r"algorithm\.name must be one of"),
        ("optim.schedule=linear", r"optim\.schedule must be one of"),
        ("optim.momentum=1", r"optim\.momentum must lie in \[0, 1\)"),
        ("epochs=3", r"steps/epochs exactly one must be set"),
        ("data.test_fraction=1", r"data\.test_fraction must lie in \(0, 1\)"),
        ("backend=mpi", r"backend must be auto, gloo or nccl"),
        ("resume=true", r"resume needs out_dir"),
        ("data.name=cifar10", r"data\.path is required for cifar10"),
    ],
)
def test_ranges_are_validated(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_gpu_configs_load_without_torchvision():
    had = "torchvision" in sys.modules
    import lookahead_dist.train.trainer  # noqa: F401  (data, models: nothing imports torchvision at import time)

    c = load_config(CONFIGS / "cifar10_resnet34.yaml")
    i = load_config(CONFIGS / "imagenet_resnet50.yaml")
    assert (c.model.name, c.data.name, c.epochs, c.optim.schedule, c.optim.momentum) == (
        "resnet34",
        "cifar10",
        200.0,
        "step",
        0.9,
    )
    assert (c.algorithm.name, c.algorithm.alpha, c.algorithm.tau) == ("lookahead", 0.5, 5)
    assert (i.model.name, i.data.name, i.model.num_classes, i.optim.milestones) == (
        "resnet50",
        "imagenet",
        1000,
        [30.0, 60.0, 80.0],
    )
    for cfg in (c, i):
        assert cfg.batch_size * 8 == 256  # 256 in total on 8 GPUs
    for name in ("digits_gossip", "digits_lookahead"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)  # the shipped configs use the current names
            load_config(CONFIGS / f"{name}.yaml")
    assert load_config(CONFIGS / "digits_gossip.yaml").algorithm.name == "decentralized"
    if not had:
        assert "torchvision" not in sys.modules


def test_missing_data_path_is_a_clear_error(tmp_path):
    cfg = load_config(CONFIGS / "cifar10_resnet34.yaml", [f"data.path={tmp_path / 'absent'}"])
    with pytest.raises(ConfigError, match=r"data\.path: '.*absent' does not exist \(data\.name cifar10\)"):
        build_data(cfg, 0, 1)


def test_resnet_without_torchvision_is_a_clear_error():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"model\.name resnet50 needs torchvision"):
            build_model(load_config(CONFIGS / "imagenet_resnet50.yaml").model)
    else:
        pytest.skip("torchvision is installed")


def test_learning_rate_schedules():
    cfg = load_config(
        None,
        [
            "optim.schedule=step",
            "optim.milestones=[2, 4]",
            "optim.milestones_in=epochs",
            "optim.decay=0.5",
            "optim.lr=0.8",
            "steps=100",
        ],
    )
    lrs = [lr_at(cfg, k, 100, steps_per_epoch=10) for k in (0, 19, 20, 39, 40, 99)]
    assert lrs == [0.8, 0.8, 0.4, 0.4, 0.2, 0.2]
    cfg = load_config(None, ["optim.warmup_steps=3", "optim.lr=0.4"])
    assert [lr_at(cfg, k, 103, 1) for k in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_at(cfg, 3, 103, 1) == pytest.approx(0.4)
    assert lr_at(cfg, 53, 103, 1) == pytest.approx(0.2)
    assert 0 < lr_at(cfg, 102, 103, 1) < 1e-3
    cfg = load_config(None, ["optim.schedule=constant"])
    assert lr_at(cfg, 399, 400, 1) == 0.1
    # the pieces the experiments use as well
    assert [step_decay(1.0, k, [5, 10], 0.5) for k in (4, 5, 9, 10)] == [1.0, 0.5, 0.5, 0.25]
    assert cosine(2.0, 0, 10) == 2.0 and cosine(2.0, 5, 10) == pytest.approx(1.0) and cosine(2.0, 10, 10) == 0.0


def test_old_spellings_load_with_a_deprecation_warning(tmp_path):
    p = write(tmp_path, "algorithm:\n  name: gossip\n  buffers: reset\n")
    with pytest.warns(DeprecationWarning) as caught:
        cfg = load_config(p)
    assert (cfg.algorithm.name, cfg.algorithm.optimizer_state) == ("decentralized", "reset")
    messages = [str(w.message) for w in caught]
    assert any("'algorithm.buffers' is deprecated, use 'algorithm.optimizer_state'" in m for m in messages)
    assert any("algorithm.name: gossip is deprecated, use algorithm.name: decentralized" in m for m in messages)
    assert len(cfg.deprecations) == 2 and all(str(p) in line for line in cfg.deprecations)
    assert to_dict(cfg)["algorithm"]["optimizer_state"] == "reset" and "buffers" not in to_dict(cfg)["algorithm"]
    with pytest.warns(DeprecationWarning) as caught:
        cfg = load_config(None, ["algorithm.buffers=average", "algorithm.name=gossip"])
    assert "--set algorithm.buffers=average: key 'algorithm.buffers' is deprecated" in str(caught[0].message)
    assert (cfg.algorithm.name, cfg.algorithm.optimizer_state) == ("decentralized", "average")
    with pytest.raises(ConfigError, match=r"'algorithm\.buffers' is the old name of 'algorithm\.optimizer_state'"):
        load_config(write(tmp_path, "algorithm:\n  buffers: reset\n  optimizer_state: keep\n"))
    with (
        pytest.warns(DeprecationWarning),
        pytest.raises(ConfigError, match=r"algorithm\.optimizer_state must be one of"),
    ):
        load_config(None, ["algorithm.buffers=nope"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert load_config(None, ["algorithm.name=decentralized"]).deprecations == []


def test_shards_are_disjoint_and_batches_deterministic():
    shards = [shard_indices(1437, r, 4, seed=3) for r in range(4)]
    flat = sorted(i for s in shards for i in s.tolist())
    assert flat == list(range(1437))
    assert (epoch_order(shards[1], 3, 1, 0) != epoch_order(shards[1], 3, 1, 1)).any()
    cfg = load_config(None, ["batch_size=50"])
    a = build_data(cfg, 1, 4)
    b = build_data(cfg, 1, 4)
    assert a.shard_size == 359 and a.steps_per_epoch == 7 and a.test_size == 90
    first = [x for x, _ in zip(a.batches(0), range(17))]
    resumed = [x for x, _ in zip(b.batches(9), range(8))]
    for (x1, y1), (x2, y2) in zip(first[9:], resumed):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert all(len(y) == 50 for _, y in first)
    x, _ = first[0]
    assert x.shape == (50, 1, 8, 8) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    other = next(build_data(cfg, 2, 4).batches(0))
    assert not torch.equal(other[0], x)
    with pytest.raises(ConfigError, match=r"batch_size: 400 is larger than this worker's shard"):
        build_data(load_config(None, ["batch_size=400"]), 0, 4)


def test_digits_cnn():
    model = DigitsCNN(10, batch_norm=True)
    n = sum(p.numel() for p in model.parameters())
    assert 5_000 <= n <= 30_000
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    with torch.no_grad():
        out = build_model(load_config(None, ["model.batch_norm=false"]).model)(torch.ones(1, 1, 8, 8))
    assert not math.isnan(float(out.sum()))


def test_overlap_keys_are_checked_against_the_algorithm():
    cfg = load_config(None, ["algorithm.overlap=true", "algorithm.overlap_slow=true"])  # slowmo over a ring
    assert cfg.algorithm.overlap is True and cfg.algorithm.overlap_slow is True
    cfg = load_config(None, ["algorithm.name=decentralized", "algorithm.overlap=true"])
    assert cfg.algorithm.overlap is True
    assert load_config(None, ["algorithm.name=local_sgd", "algorithm.overlap_slow=true"]).algorithm.overlap_slow
    with pytest.raises(ConfigError, match=r"algorithm\.overlap overlaps gossip: .*name is local_sgd"):
        load_config(None, ["algorithm.name=local_sgd", "algorithm.overlap=true"])
    with pytest.raises(ConfigError, match=r"algorithm\.overlap overlaps gossip: .*topology None"):
        load_config(None, ["algorithm.topology=null", "algorithm.overlap=true"])
    with pytest.raises(ConfigError, match=r"algorithm\.overlap_slow overlaps a slow step: .*name is decentralized"):
        load_config(None, ["algorithm.name=decentralized", "algorithm.overlap_slow=true"])
    with pytest.raises(ConfigError, match=r"algorithm\.overlap_slow cannot be combined with algorithm\.shard"):
        load_config(None, ["algorithm.overlap_slow=true", "algorithm.shard=true"])
    with pytest.raises(ConfigError, match=r"algorithm\.overlap: expected true or false, got 'yes please'"):
        load_config(None, ["algorithm.overlap=yes please"])


def test_diloco_configs_load_with_the_outer_section_filled():
    import yaml

    from lookahead_dist.train.trainer import _outer_factory

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        d = load_config(CONFIGS / "digits_diloco.yaml")
        g = load_config(CONFIGS / "cifar10_resnet34_diloco.yaml")
    for cfg in (d, g):
        a, o = cfg.algorithm, cfg.outer
        assert (a.name, a.topology, a.alpha, a.beta, cfg.optim.name) == ("diloco", None, None, None, "adamw")
        assert (o.name, o.lr, o.momentum, o.nesterov, o.betas, o.eps) == ("sgd", 0.7, 0.9, True, None, None)
    assert (d.algorithm.tau, d.algorithm.fragments, d.algorithm.sync_dtype) == (20, 1, None)
    assert (g.model.name, g.algorithm.tau, g.batch_size * 8) == ("resnet34", 100, 256)
    text = yaml.safe_dump(to_dict(d), sort_keys=False)
    assert "alpha: null" in text and "nesterov: true" in text
    opt = _outer_factory(d)([torch.zeros(3, requires_grad=True)])
    assert type(opt) is torch.optim.SGD
    assert {k: opt.defaults[k] for k in ("lr", "momentum", "nesterov", "weight_decay")} == {
        "lr": 0.7,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 0.0,
    }
    assert _outer_factory(load_config()) is None  # the default run: SlowMo's own rule


def test_config_yaml_of_a_diloco_run_loads_back(tmp_path):
    import yaml

    cfg = load_config(CONFIGS / "digits_diloco.yaml", ["algorithm.sync_dtype=int8", "outer.lr=0.5"])
    p = write(tmp_path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    assert to_dict(load_config(p)) == to_dict(cfg)


def test_outer_defaults_per_optimizer_and_the_two_ways_to_select_one():
    from lookahead_dist.train.trainer import _outer_factory

    d = load_config(None, ["algorithm.name=diloco"])  # outer.name null: DiLoCo's Nesterov SGD, local steps
    assert (d.outer.name, d.outer.lr, d.outer.momentum, d.outer.nesterov, d.algorithm.topology) == (
        "sgd",
        0.7,
        0.9,
        True,
        None,
    )
    ring = load_config(None, ["algorithm.name=diloco", "algorithm.topology=topologies/ring.yaml"])
    assert ring.algorithm.topology == "topologies/ring.yaml"  # given: DiLoCo over ring gossip
    s = load_config(None, ["outer.name=adamw", "outer.betas=[0.9, 0.95]"])  # slowmo with an outer optimizer
    assert (s.algorithm.name, s.algorithm.topology, s.algorithm.alpha, s.algorithm.beta) == (
        "slowmo",
        "topologies/ring.yaml",
        None,
        None,
    )
    assert (s.outer.lr, s.outer.betas, s.outer.eps, s.outer.weight_decay, s.outer.momentum) == (
        0.001,
        [0.9, 0.95],
        1e-8,
        0.01,
        None,
    )
    opt = _outer_factory(s)([torch.zeros(2, 2, requires_grad=True)])
    assert type(opt) is torch.optim.AdamW and opt.defaults["betas"] == (0.9, 0.95)
    assert load_config(None, ["outer.name=adam"]).outer.weight_decay == 0.0
    a = load_config(None, ["algorithm.name=diloco", "algorithm.alpha=null", "algorithm.fragments=4"])
    assert (a.algorithm.alpha, a.algorithm.fragments) == (None, 4)
    plain = load_config(None, ["algorithm.alpha=null"])  # no outer optimizer: null is the default
    assert (plain.algorithm.alpha, plain.algorithm.beta) == (1.0, 0.5)


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        # an outer optimizer replaces alpha and beta: given explicitly, even at their default values
        (
            ["algorithm.name=diloco", "algorithm.alpha=0.5"],
            r"algorithm\.alpha \(0\.5\) contradicts algorithm\.name diloco",
        ),
        (
            ["algorithm.name=diloco", "algorithm.beta=0.5"],
            r"algorithm\.beta \(0\.5\) contradicts algorithm\.name diloco",
        ),
        (["outer.name=sgd", "algorithm.alpha=1.0"], r"algorithm\.alpha \(1\.0\) contradicts outer\.name sgd"),
        # a key of another optimizer, and outer keys with no outer optimizer
        (
            ["algorithm.name=diloco", "outer.betas=[0.9, 0.95]"],
            r"outer\.betas applies to outer\.name adam or adamw, not sgd",
        ),
        (["outer.name=adam", "outer.nesterov=true"], r"outer\.nesterov applies to outer\.name sgd, not adam"),
        (["outer.lr=0.5"], r"outer\.lr is set but no outer optimizer runs \(outer\.name is null"),
        (
            ["algorithm.name=decentralized", "outer.name=sgd"],
            r"outer\.name is set but no outer optimizer runs \(algorithm\.name is decentralized",
        ),
        (["algorithm.scale_by_gamma=true"], r"algorithm\.scale_by_gamma scales an outer optimizer, but none runs"),
        # ranges and types
        (["algorithm.name=diloco", "outer.lr=0"], r"outer\.lr must be > 0, got 0\.0"),
        (["algorithm.name=diloco", "outer.momentum=1"], r"outer\.momentum must lie in \[0, 1\), got 1\.0"),
        (
            ["algorithm.name=diloco", "outer.momentum=0", "outer.nesterov=true"],
            r"outer\.nesterov needs outer\.momentum > 0",
        ),
        (["outer.name=adam", "outer.betas=[0.9]"], r"outer\.betas must be two numbers in \[0, 1\), got \[0\.9\]"),
        (["outer.name=adam", "outer.eps=0"], r"outer\.eps must be > 0"),
        (["outer.name=lamb"], r"outer\.name must be one of \(None, 'sgd', 'adam', 'adamw'\), got 'lamb'"),
        (["outer.lr=fast"], r"outer\.lr: expected a number or null, got 'fast'"),
        (["outer.nesterov=2"], r"outer\.nesterov: expected true or false or null, got 2"),
        (["outer.momentm=0.9"], r"unknown key 'outer\.momentm'"),
        # fragments and sync_dtype against tau, the algorithm and the keys they cannot go with
        (["algorithm.fragments=13"], r"algorithm\.fragments must lie in \[1, algorithm\.tau\] = \[1, 12\], got 13"),
        (["algorithm.fragments=0"], r"algorithm\.fragments must be an integer >= 1, got 0"),
        (
            ["algorithm.fragments=2", "algorithm.shard=true"],
            r"algorithm\.fragments cannot be combined with algorithm\.shard",
        ),
        (
            ["algorithm.fragments=2", "algorithm.optimizer_state=reset"],
            r"algorithm\.fragments needs algorithm\.optimizer_state keep",
        ),
        (
            ["algorithm.name=decentralized", "algorithm.fragments=2"],
            r"algorithm\.fragments streams a slow step: .*name is decentralized",
        ),
        (
            ["algorithm.sync_dtype=int4"],
            r"algorithm\.sync_dtype must be one of \(None, 'float32', 'bfloat16', 'int8'\)",
        ),
        (
            ["algorithm.sync_dtype=int8", "algorithm.shard=true"],
            r"algorithm\.sync_dtype cannot be combined with algorithm\.shard: true",
        ),
        (
            ["algorithm.sync_dtype=bfloat16", "algorithm.overlap_slow=true"],
            r"algorithm\.sync_dtype cannot be combined with algorithm\.overlap_slow: true",
        ),
        (["algorithm.name=allreduce", "algorithm.sync_dtype=int8"], r"algorithm\.sync_dtype compresses a slow step"),
    ],
)
def test_outer_and_slow_step_keys_are_checked(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_alpha_given_in_a_file_contradicts_an_outer_optimizer(tmp_path):
    p = write(tmp_path, "algorithm:\n  name: diloco\n  alpha: 1.0\n")  # the default value, but written
    with pytest.raises(ConfigError, match=r"run\.yaml: algorithm\.alpha \(1\.0\) contradicts algorithm\.name diloco"):
        load_config(p)
    # a Config built in Python has no record of what was written: a non-default value counts as given
    cfg = Config()
    cfg.algorithm.name, cfg.algorithm.beta = "diloco", 0.6
    with pytest.raises(ConfigError, match=r"algorithm\.beta \(0\.6\) contradicts"):
        validate(cfg)
    cfg.algorithm.beta = 0.5
    assert validate(cfg).algorithm.beta is None


def test_digits_models_go_with_the_digits_data_only():
    assert load_config(None, ["model.name=digits_mlp"]).model.name == "digits_mlp"
    with pytest.raises(ConfigError, match=r"model\.name digits_cnn and digits_mlp go with data\.name digits"):
        load_config(None, ["model.name=resnet34"])
