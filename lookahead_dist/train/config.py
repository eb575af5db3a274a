"""Run configuration: typed dataclasses filled from YAML and ``--set key.sub=value`` overrides.

Every field has a default, so no file is needed: the defaults are the digits
run (SlowMo over ring gossip on 4 CPU ranks, under two minutes). A file or an
override may only name fields that exist; an unknown key or a value of the
wrong type is a :class:`~lookahead_dist.errors.ConfigError` naming the file
and the key path (``optim.lr``, ``algorithm.tau``)::

    model:      {name: digits_cnn, num_classes: 10, batch_norm: true}
    data:       {name: digits, path: null, test_fraction: 0.2, num_workers: 0}
    optim:      {name: sgd, lr: 0.1, momentum: 0.9, nesterov: false, weight_decay: 0.0,
                 schedule: cosine, milestones: [], milestones_in: steps, decay: 0.1, warmup_steps: 0}
    algorithm:  {name: slowmo, topology: topologies/ring.yaml, tau: 12, alpha: 1.0, beta: 0.5,
                 buffers: keep, shard: false, mix_buffers: true}
    debug:      {nan_step: null, nan_rank: 0}
    steps: 400          # or epochs: 90 (exactly one of the two; the other null)
    epochs: null
    batch_size: 32      # per worker
    seed: 0
    log_every: 25
    eval_every: 100     # 0: only at the end
    out_dir: null       # default runs/<name or timestamp>
    name: null
    checkpoint_every: 0 # 0: no checkpoints
    resume: false
    backend: auto       # auto | gloo | nccl
    device: auto        # auto | cpu | cuda
    timeout_s: 300

>>> cfg = load_config(None, ["optim.lr=0.05", "algorithm.name=gossip"])
>>> cfg.optim.lr, cfg.algorithm.name
(0.05, 'gossip')
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

import yaml

from lookahead_dist.errors import ConfigError

__all__ = [
    "AlgorithmConfig",
    "Config",
    "DataConfig",
    "DebugConfig",
    "ModelConfig",
    "OptimConfig",
    "REPO_ROOT",
    "load_config",
    "resolve_topology",
    "to_dict",
    "validate",
]

#: The directory above the package: where ``topologies/`` and ``launch/`` live in a source checkout.
REPO_ROOT = Path(__file__).resolve().parents[2]

MODELS = ("digits_cnn", "resnet34", "resnet50")
DATASETS = ("digits", "cifar10", "imagenet")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
ALGORITHMS = ("slowmo", "gossip", "lookahead", "local_sgd", "allreduce")
BUFFERS = ("keep", "reset", "average")


@dataclass
class ModelConfig:
    name: str = "digits_cnn"
    num_classes: int = 10
    batch_norm: bool = True  # digits_cnn only


@dataclass
class DataConfig:
    name: str = "digits"
    path: Optional[str] = None  # required for cifar10 / imagenet
    test_fraction: float = 0.2  # digits: the held-out split
    num_workers: int = 0  # DataLoader processes per rank (cifar10 / imagenet)


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "cosine"
    milestones: List[float] = field(default_factory=list)  # step schedule: where lr *= decay
    milestones_in: str = "steps"  # "steps" or "epochs"
    decay: float = 0.1
    warmup_steps: int = 0  # linear warm-up from lr / (warmup_steps + 1)


@dataclass
class AlgorithmConfig:
    name: str = "slowmo"
    # slowmo: the gossip base (null: local steps); gossip: the schedule; unused by the other algorithms
    topology: Optional[str] = "topologies/ring.yaml"
    tau: int = 12
    alpha: float = 1.0
    beta: float = 0.5
    buffers: str = "keep"  # base-optimizer state at a slow step: keep | reset | average
    shard: bool = False
    mix_buffers: bool = True  # mix BatchNorm statistics with the parameters


@dataclass
class DebugConfig:
    """Testing aids. ``nan_step``: multiply the loss by NaN at that step on rank ``nan_rank``.
    ``kill_step``: rank ``kill_rank`` kills itself (SIGKILL) at that step, on the first attempt only
    (TORCHELASTIC_RESTART_COUNT 0), to exercise torchrun's restarts."""

    nan_step: Optional[int] = None
    nan_rank: int = 0
    kill_step: Optional[int] = None
    kill_rank: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    steps: Optional[int] = 400
    epochs: Optional[float] = None
    batch_size: int = 32  # per worker
    seed: int = 0
    log_every: int = 25
    eval_every: int = 100
    out_dir: Optional[str] = None
    name: Optional[str] = None
    checkpoint_every: int = 0
    resume: bool = False
    backend: str = "auto"
    device: str = "auto"
    timeout_s: float = 300.0
    source: str = field(default="<defaults>", metadata={"internal": True})


# -- filling dataclasses from mappings --------------------------------------------------


def _fields(cls) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(inner[0])} or null"
    if origin in (list, List):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value, tp, where: str, path: str, shown=None):
    """``value`` checked against ``tp`` (int, float, bool, str, Optional[...], List[...])."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return _coerce(value, inner, where, path, shown=tp)
    bad = ConfigError(f"{where}: {path}: expected {_type_name(shown or tp)}, got {value!r}")
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise bad
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, where, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise AssertionError(f"unsupported config type {tp}")  # pragma: no cover


def _fill(obj, mapping, where: str, prefix: str) -> None:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'the top level'}: expected a mapping of keys, "
                          f"got {mapping!r}")
    known = _fields(type(obj))
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"{where}: unknown key {path!r} (known: {', '.join(known)})")
        _, tp = known[key]
        if dataclasses.is_dataclass(tp):
            _fill(getattr(obj, key), value, where, path + ".")
        else:
            setattr(obj, key, _coerce(value, tp, where, path))


def _parse_override(text: str, tp):
    """A ``--set`` value converted with the field's type (YAML parsing; strings stay verbatim)."""
    origin = typing.get_origin(tp)
    optional = origin is typing.Union
    base = [a for a in typing.get_args(tp) if a is not type(None)][0] if optional else tp
    if optional and text.strip() in ("null", "~", "None", "none"):
        return None
    if base is str:
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # reported as the wrong type by _coerce
    if base is float and isinstance(value, str):
        try:
            return float(value)  # "1e-3": YAML 1.1 reads it as a string
        except ValueError:
            return value
    if base is bool and value in (0, 1) and not isinstance(value, bool):
        return bool(value)
    return value


def _apply_override(cfg: Config, item: str) -> None:
    where = f"--set {item}"
    if "=" not in item:
        raise ConfigError(f"{where}: expected key.sub=value")
    key, text = item.split("=", 1)
    key = key.strip()
    obj, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        known = _fields(type(obj))
        path = ".".join(parts[: i + 1])
        if part not in known:
            raise ConfigError(f"{where}: unknown key {path!r} (known: {', '.join(known)})")
        _, tp = known[part]
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"{where}: {path!r} is a value, not a section")
            obj = getattr(obj, part)
        elif dataclasses.is_dataclass(tp):
            raise ConfigError(f"{where}: {path!r} is a section; set one of its keys ({', '.join(_fields(tp))})")
        else:
            setattr(obj, part, _coerce(_parse_override(text, tp), tp, where, path))


# -- validation --------------------------------------------------------------------------


def _require(ok: bool, where: str, path: str, rule: str, value) -> None:
    if not ok:
        raise ConfigError(f"{where}: {path} {rule}, got {value!r}")


def validate(cfg: Config) -> Config:
    """Check ranges and combinations; return ``cfg``. Does not touch the file system or import torchvision."""
    w = cfg.source
    _require(cfg.model.name in MODELS, w, "model.name", f"must be one of {MODELS}", cfg.model.name)
    _require(cfg.model.num_classes >= 2, w, "model.num_classes", "must be >= 2", cfg.model.num_classes)
    d = cfg.data
    _require(d.name in DATASETS, w, "data.name", f"must be one of {DATASETS}", d.name)
    _require(0.0 < d.test_fraction < 1.0, w, "data.test_fraction", "must lie in (0, 1)", d.test_fraction)
    _require(d.num_workers >= 0, w, "data.num_workers", "must be >= 0", d.num_workers)
    _require(d.name == "digits" or bool(d.path), w, "data.path", f"is required for {d.name}", d.path)
    _require((cfg.model.name == "digits_cnn") == (d.name == "digits"), w, "model.name",
             f"digits_cnn goes with data.name digits (data.name is {d.name!r})", cfg.model.name)
    o = cfg.optim
    _require(o.name in OPTIMIZERS, w, "optim.name", f"must be one of {OPTIMIZERS}", o.name)
    _require(math.isfinite(o.lr) and o.lr > 0, w, "optim.lr", "must be > 0", o.lr)
    _require(0.0 <= o.momentum < 1.0, w, "optim.momentum", "must lie in [0, 1)", o.momentum)
    _require(not o.nesterov or (o.name == "sgd" and o.momentum > 0), w, "optim.nesterov",
             "needs optim.name sgd and momentum > 0", o.nesterov)
    _require(o.weight_decay >= 0.0, w, "optim.weight_decay", "must be >= 0", o.weight_decay)
    _require(o.schedule in SCHEDULES, w, "optim.schedule", f"must be one of {SCHEDULES}", o.schedule)
    _require(all(m >= 0 for m in o.milestones) and list(o.milestones) == sorted(o.milestones), w,
             "optim.milestones", "must be non-negative and increasing", o.milestones)
    _require(o.milestones_in in ("steps", "epochs"), w, "optim.milestones_in", "must be steps or epochs",
             o.milestones_in)
    _require(0.0 < o.decay <= 1.0, w, "optim.decay", "must lie in (0, 1]", o.decay)
    _require(o.warmup_steps >= 0, w, "optim.warmup_steps", "must be >= 0", o.warmup_steps)
    a = cfg.algorithm
    _require(a.name in ALGORITHMS, w, "algorithm.name", f"must be one of {ALGORITHMS}", a.name)
    _require(a.tau >= 1, w, "algorithm.tau", "must be >= 1", a.tau)
    _require(0.0 < a.alpha <= 1.0, w, "algorithm.alpha", "must lie in (0, 1]", a.alpha)
    _require(0.0 <= a.beta < 1.0, w, "algorithm.beta", "must lie in [0, 1)", a.beta)
    _require(a.buffers in BUFFERS, w, "algorithm.buffers", f"must be one of {BUFFERS}", a.buffers)
    _require(a.name != "gossip" or bool(a.topology), w, "algorithm.topology", "is required for gossip", a.topology)
    _require((cfg.steps is None) != (cfg.epochs is None), w, "steps/epochs",
             "exactly one must be set (set the other to null)", (cfg.steps, cfg.epochs))
    _require(cfg.steps is None or cfg.steps >= 1, w, "steps", "must be >= 1", cfg.steps)
    _require(cfg.epochs is None or cfg.epochs > 0, w, "epochs", "must be > 0", cfg.epochs)
    _require(cfg.batch_size >= 1, w, "batch_size", "must be >= 1", cfg.batch_size)
    _require(cfg.log_every >= 1, w, "log_every", "must be >= 1", cfg.log_every)
    _require(cfg.eval_every >= 0, w, "eval_every", "must be >= 0 (0: only at the end)", cfg.eval_every)
    _require(cfg.checkpoint_every >= 0, w, "checkpoint_every", "must be >= 0 (0: none)", cfg.checkpoint_every)
    _require(not cfg.resume or bool(cfg.out_dir), w, "resume", "needs out_dir (the run directory to resume)",
             cfg.resume)
    _require(cfg.backend in ("auto", "gloo", "nccl"), w, "backend", "must be auto, gloo or nccl", cfg.backend)
    _require(cfg.device in ("auto", "cpu", "cuda"), w, "device", "must be auto, cpu or cuda", cfg.device)
    _require(cfg.timeout_s > 0, w, "timeout_s", "must be > 0", cfg.timeout_s)
    _require(cfg.debug.nan_step is None or cfg.debug.nan_step >= 0, w, "debug.nan_step", "must be >= 0",
             cfg.debug.nan_step)
    return cfg


# -- entry points ------------------------------------------------------------------------


def load_config(path=None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (optional), then ``overrides`` ("key.sub=value"), validated."""
    cfg = Config()
    sources = []
    if path is not None:
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text())
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read the config file ({exc.strerror or exc})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: malformed YAML: {exc}") from None
        _fill(cfg, data or {}, str(p), "")
        sources.append(str(p))
    for item in overrides:
        _apply_override(cfg, item)
    if overrides:
        sources.append("--set " + " ".join(overrides))
    cfg.source = " + ".join(sources) or "<defaults>"
    return validate(cfg)


def to_dict(cfg) -> dict:
    """The config as plain data (what config.yaml in a run directory holds)."""
    out = {}
    for name in _fields(type(cfg)):
        value = getattr(cfg, name)
        out[name] = to_dict(value) if dataclasses.is_dataclass(value) else (list(value) if isinstance(value, list)
                                                                            else value)
    return out


def resolve_topology(spec: str, config_source: str = "") -> Path:
    """A topology path: as given if it exists (absolute, or relative to the working directory),
    else relative to the config file's directory, else relative to the repository root."""
    p = Path(spec).expanduser()
    tried = [p]
    if not p.is_absolute():
        first = config_source.split(" + ")[0]
        if first and not first.startswith("<") and not first.startswith("--set"):
            tried.append(Path(first).resolve().parent / p)
        tried.append(REPO_ROOT / p)
    for cand in tried:
        if cand.is_file():
            return cand
    raise ConfigError(f"algorithm.topology: no topology file {spec!r} (looked at {', '.join(map(str, tried))})")
