"""Run configuration: typed dataclasses filled from YAML and ``--set key.sub=value`` overrides.

Length: over 500 lines, kept whole on purpose: one dataclass per section of the file and the check of
every key beside it, so that a key, its default and its check are read and changed together.

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
                 optimizer_state: keep, shard: false, mix_buffers: true, overlap: false, overlap_slow: false,
                 fragments: 1, sync_dtype: null, scale_by_gamma: false}
    outer:      {name: null, lr: null, momentum: null, nesterov: null, betas: null, eps: null,
                 weight_decay: null}
    debug:      {nan_step: null, nan_rank: 0}
    elastic:    {enabled: false, heartbeat: 0.5, dead_after: 10.0, timeout: 60.0, history: null, sync_every: null}
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

>>> cfg = load_config(None, ["optim.lr=0.05", "algorithm.name=decentralized"])
>>> cfg.optim.lr, cfg.algorithm.name
(0.05, 'decentralized')

Old spellings still load, with a :class:`DeprecationWarning` (and a line in
``Config.deprecations``, which the trainer prints on rank 0):
``algorithm.name: gossip`` is ``decentralized`` (it runs any topology file:
gossip, push-sum, local SGD, two-agent Lookahead), and ``algorithm.buffers``
is ``algorithm.optimizer_state``.

The checks of tau, alpha, beta, integers and the optimizer-state policy are
those of :mod:`lookahead_dist.validation`; only the message is this module's
(the file and the key path).

Outer optimizers (DiLoCo). ``algorithm.name: diloco`` is SlowMo whose slow
step is the optimizer of the ``outer:`` section (``outer.name`` null means
sgd), stepped on the pseudo-gradient z - x_bar over the inner optimizer of
``optim:``; its base between syncs is local steps unless ``algorithm.topology``
is given. ``algorithm.name: slowmo`` with ``outer.name`` set is the same over
SlowMo's defaults (ring gossip). An ``outer:`` key left null takes the
optimizer's default, filled in by :func:`validate`: sgd lr 0.7, momentum 0.9,
nesterov true, weight_decay 0 (DiLoCo's); adam and adamw lr 0.001, betas
[0.9, 0.999], eps 1e-8, weight_decay 0 (adamw 0.01). Contradictions are errors
naming both keys: ``algorithm.alpha`` or ``beta`` given with an outer optimizer
(it replaces them; with one, both become null), an ``outer:`` key of another
optimizer (``outer.betas`` with sgd), an ``outer:`` key with no outer
optimizer. "Given" means written in the file or a ``--set`` with a value other
than null (:attr:`Config.given`), or, for a Config built in Python, different
from the default. ``algorithm.fragments``, ``sync_dtype`` and ``scale_by_gamma``
are SlowMo's arguments of the same names (slowmo, diloco, local_sgd).
"""

from __future__ import annotations

import dataclasses
import math
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

import yaml

from lookahead_dist import validation as check
from lookahead_dist.errors import ConfigError
from lookahead_dist.validation import short_repr

__all__ = [
    "AlgorithmConfig",
    "Config",
    "DataConfig",
    "DebugConfig",
    "ElasticConfig",
    "ModelConfig",
    "OptimConfig",
    "OuterConfig",
    "REPO_ROOT",
    "load_config",
    "resolve_topology",
    "to_dict",
    "validate",
]

#: The directory above the package: where ``topologies/`` and ``launch/`` live in a source checkout.
REPO_ROOT = Path(__file__).resolve().parents[2]

MODELS = ("digits_cnn", "digits_mlp", "resnet34", "resnet50")
DIGITS_MODELS = ("digits_cnn", "digits_mlp")  # 8x8 inputs
DATASETS = ("digits", "cifar10", "imagenet")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
ALGORITHMS = ("slowmo", "diloco", "decentralized", "lookahead", "local_sgd", "allreduce")
OUTER_OPTIMIZERS = ("sgd", "adam", "adamw")
SYNC_DTYPES = (None, "float32", "bfloat16", "int8")
#: The algorithms that run SlowMo's slow step (fragments, sync_dtype apply to them).
SLOW_STEP_ALGORITHMS = ("slowmo", "diloco", "local_sgd")
#: Each outer optimizer's defaults (an outer key left null); the keys absent from one do not apply to it.
OUTER_DEFAULTS = {
    "sgd": {"lr": 0.7, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0},
    "adam": {"lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01},
}
#: Old spellings that still load, with a DeprecationWarning: key paths, and values of a key path.
RENAMED_KEYS = {"algorithm.buffers": "algorithm.optimizer_state"}
RENAMED_VALUES = {"algorithm.name": {"gossip": "decentralized"}}


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
    # slowmo: the base between slow steps (null: local steps); decentralized: the schedule; else unused
    topology: Optional[str] = "topologies/ring.yaml"
    tau: int = 12
    alpha: Optional[float] = 1.0  # null: the default; null with an outer optimizer (it replaces alpha and beta)
    beta: Optional[float] = 0.5
    optimizer_state: str = "keep"  # base-optimizer state at a slow step: keep | reset | average
    shard: bool = False
    mix_buffers: bool = True  # mix BatchNorm statistics with the parameters
    overlap: bool = False  # gossip behind the next forward/backward (combine-then-adapt): decentralized, slowmo
    overlap_slow: bool = False  # slow step's all-reduce behind the next base step: slowmo, local_sgd, lookahead
    fragments: int = 1  # streaming fragments of the slow step, in [1, tau]: slowmo, diloco, local_sgd
    sync_dtype: Optional[str] = None  # the slow step's wire format: null (float32), float32, bfloat16, int8
    scale_by_gamma: bool = False  # outer step on (z - x_bar) / gamma with lr * gamma (any inner schedule)


@dataclass
class OuterConfig:
    """The slow step's optimizer (DiLoCo): a key left null takes the optimizer's default (OUTER_DEFAULTS)."""

    name: Optional[str] = None  # sgd | adam | adamw; null: none (slowmo) or sgd (diloco)
    lr: Optional[float] = None
    momentum: Optional[float] = None  # sgd
    nesterov: Optional[bool] = None  # sgd
    betas: Optional[List[float]] = None  # adam, adamw
    eps: Optional[float] = None  # adam, adamw
    weight_decay: Optional[float] = None


@dataclass
class ElasticConfig:
    """Elastic membership (docs/ELASTIC.md): a lost worker's survivors regroup and go on. Launch with
    ``python -m lookahead_dist.elastic``. Seconds: ``heartbeat`` between beats in the store, ``dead_after`` a
    member whose beat has not moved is dead, ``timeout`` to agree on and form a new group; ``history`` (null: the
    topology's depth + 2) per-step copies of the state, ``sync_every`` (null: tau, else 10) steps between the
    checks for restarted members asking to rejoin."""

    enabled: bool = False
    heartbeat: float = 0.5
    dead_after: float = 10.0
    timeout: float = 60.0
    history: Optional[int] = None
    sync_every: Optional[int] = None


#: What elastic membership cannot run: (key path, the value that is refused or a test of it, why).
ELASTIC_REFUSED = (
    ("algorithm.overlap", True, "its exchange is in flight across the steps the survivors roll back"),
    ("algorithm.overlap_slow", True, "its slow step is in flight across the steps the survivors roll back"),
    ("algorithm.shard", True, "its slow state is cut by the world size"),
)


@dataclass
class DebugConfig:
    """Testing aids. ``nan_step``: multiply the loss by NaN at that step on rank ``nan_rank``.
    ``kill_step``: rank ``kill_rank`` kills itself (SIGKILL) at that step, on the first attempt only
    (TORCHELASTIC_RESTART_COUNT 0), to exercise torchrun's restarts. ``step_sleep``: seconds every
    elastic member sleeps per step, so that a restarted worker is back before a short run ends."""

    nan_step: Optional[int] = None
    nan_rank: int = 0
    kill_step: Optional[int] = None
    kill_rank: int = 0
    step_sleep: float = 0.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
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
    #: What was spelled the old way (one line each); the trainer prints them on rank 0.
    deprecations: List[str] = field(default_factory=list, metadata={"internal": True})
    #: The key paths a file or a --set gave a value other than null (see "given" in the module docstring).
    given: set = field(default_factory=set, metadata={"internal": True}, compare=False, repr=False)


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
    bad = ConfigError(f"{where}: {path}: expected {_type_name(shown or tp)}, got {short_repr(value)}")
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
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float64 (e.g. 400 digits)
            raise bad from None
        if not math.isfinite(number):  # inf epochs or timeout_s would fail only later, inside the trainer
            raise ConfigError(f"{where}: {path}: expected a finite number, got {short_repr(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise AssertionError(f"unsupported config type {tp}")  # pragma: no cover


def _deprecated(notes: Optional[list], where: str, old: str, new: str) -> None:
    """An old spelling was used: a DeprecationWarning, and a line in ``notes`` (Config.deprecations)."""
    message = f"{where}: {old} is deprecated, use {new}"
    warnings.warn(message, DeprecationWarning, stacklevel=4)
    if notes is not None:
        notes.append(message)


def _fill(obj, mapping, where: str, prefix: str, notes: Optional[list] = None, given: Optional[set] = None) -> None:
    if not isinstance(mapping, dict):
        raise ConfigError(
            f"{where}: {prefix.rstrip('.') or 'the top level'}: expected a mapping of keys, got {short_repr(mapping)}"
        )
    known = _fields(type(obj))
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if path in RENAMED_KEYS:
            new_path = RENAMED_KEYS[path]
            new_key = new_path.rsplit(".", 1)[-1]
            if new_key in mapping:
                raise ConfigError(f"{where}: {path!r} is the old name of {new_path!r}; give only {new_path!r}")
            _deprecated(notes, where, f"key {path!r}", f"{new_path!r}")
            key, path = new_key, new_path
        if key not in known:
            raise ConfigError(f"{where}: unknown key {path!r} (known: {', '.join(known)})")
        _, tp = known[key]
        if dataclasses.is_dataclass(tp):
            _fill(getattr(obj, key), value, where, path + ".", notes, given)
        else:
            setattr(obj, key, _coerce(value, tp, where, path))
            if given is not None:
                (given.add if value is not None else given.discard)(path)


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
    except (yaml.YAMLError, RecursionError, ValueError):  # nested too deeply; an integer of over 4300 digits
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
    if key in RENAMED_KEYS:
        _deprecated(cfg.deprecations, where, f"key {key!r}", f"{RENAMED_KEYS[key]!r}")
        key = RENAMED_KEYS[key]
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
            (cfg.given.add if getattr(obj, part) is not None else cfg.given.discard)(path)


# -- validation --------------------------------------------------------------------------


def _require(ok: bool, where: str, path: str, rule: str, value) -> None:
    if not ok:
        raise ConfigError(f"{where}: {path} {rule}, got {short_repr(value)}")


def _check(where: str, rule_check, value, path: str, hint: str = "", **kw):
    """``rule_check(value, path, **kw)`` (a check of :mod:`lookahead_dist.validation`), its error prefixed with
    ``where`` (the file or the --set); returns the checked value."""
    try:
        return rule_check(value, path, **kw)
    except ConfigError as exc:
        rule = getattr(exc, "rule", None)
        if rule is None:
            raise ConfigError(f"{where}: {exc}") from None
        raise ConfigError(f"{where}: {path} {rule}, got {short_repr(value)}{hint}") from None


def _rename_values(cfg: Config) -> None:
    """Old values (RENAMED_VALUES) replaced by the new ones, with a DeprecationWarning."""
    for path, renames in RENAMED_VALUES.items():
        section, key = path.split(".")
        obj = getattr(cfg, section)
        old = getattr(obj, key)
        if isinstance(old, str) and old in renames:
            setattr(obj, key, renames[old])
            _deprecated(cfg.deprecations, cfg.source, f"{path}: {old}", f"{path}: {renames[old]}")


def _validate_outer(cfg: Config) -> bool:
    """The ``outer:`` section and what contradicts it; True when an outer optimizer runs.

    With one: ``outer.name`` null becomes sgd (diloco), its null keys take OUTER_DEFAULTS, ``algorithm.alpha`` and
    ``beta`` become null (an error if given), and diloco's topology becomes null unless given. Without one: every
    ``outer:`` key must be null, and a null ``algorithm.alpha`` or ``beta`` takes its default.
    """
    w, a, o = cfg.source, cfg.algorithm, cfg.outer
    _check(w, check.check_choice, o.name, "outer.name", choices=(None,) + OUTER_OPTIMIZERS)
    if a.name == "diloco" and o.name is None:
        o.name = "sgd"
    keys = [f.name for f in dataclasses.fields(OuterConfig) if f.name != "name"]
    defaults = AlgorithmConfig()
    if not (a.name == "diloco" or (a.name == "slowmo" and o.name is not None)):
        why = f"algorithm.name is {a.name}" if a.name != "slowmo" else "outer.name is null"
        for key in ["name", *keys]:
            rule = (
                f"is set but no outer optimizer runs ({why}; it needs algorithm.name diloco, or slowmo with outer.name)"
            )
            _require(getattr(o, key) is None, w, f"outer.{key}", rule, getattr(o, key))
        _require(
            not a.scale_by_gamma,
            w,
            "algorithm.scale_by_gamma",
            f"scales an outer optimizer, but none runs ({why})",
            a.scale_by_gamma,
        )
        a.alpha = defaults.alpha if a.alpha is None else a.alpha
        a.beta = defaults.beta if a.beta is None else a.beta
        return False
    by = f"algorithm.name {a.name}" if a.name == "diloco" else f"outer.name {o.name}"
    for key in ("alpha", "beta"):
        value, path = getattr(a, key), f"algorithm.{key}"
        if value is not None and (path in cfg.given or value != getattr(defaults, key)):
            raise ConfigError(
                f"{w}: {path} ({short_repr(value)}) contradicts {by}: the outer optimizer ({o.name}) replaces "
                f"SlowMo's alpha and beta; configure the outer: section (outer.lr, ...) instead, and remove {path} "
                "(or set it to null)"
            )
        setattr(a, key, None)
    if a.name == "diloco" and "algorithm.topology" not in cfg.given and a.topology == defaults.topology:
        a.topology = None  # DiLoCo: local inner steps unless a topology is given
    own = OUTER_DEFAULTS[o.name]
    for key in keys:
        value = getattr(o, key)
        if key not in own:
            users = " or ".join(name for name, d in OUTER_DEFAULTS.items() if key in d)
            _require(value is None, w, f"outer.{key}", f"applies to outer.name {users}, not {o.name}", value)
        elif value is None:
            setattr(o, key, list(own[key]) if isinstance(own[key], list) else own[key])
    _require(o.lr > 0, w, "outer.lr", "must be > 0", o.lr)
    _require(o.weight_decay >= 0.0, w, "outer.weight_decay", "must be >= 0", o.weight_decay)
    if o.name == "sgd":
        _require(0.0 <= o.momentum < 1.0, w, "outer.momentum", "must lie in [0, 1)", o.momentum)
        _require(not o.nesterov or o.momentum > 0, w, "outer.nesterov", "needs outer.momentum > 0", o.nesterov)
    else:
        _require(
            len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas),
            w,
            "outer.betas",
            "must be two numbers in [0, 1)",
            o.betas,
        )
        _require(o.eps > 0, w, "outer.eps", "must be > 0", o.eps)
    return True


def _validate_slow_step_options(cfg: Config) -> None:
    """algorithm.fragments and algorithm.sync_dtype, against the algorithm and the keys they cannot go with."""
    w, a = cfg.source, cfg.algorithm
    slow = ", ".join(SLOW_STEP_ALGORITHMS)
    _check(w, check.check_int, a.fragments, "algorithm.fragments", low=1)
    if a.fragments > 1:
        _require(
            a.name in SLOW_STEP_ALGORITHMS,
            w,
            "algorithm.fragments",
            f"streams a slow step: it needs algorithm.name {slow} (name is {a.name})",
            a.fragments,
        )
        _require(
            a.fragments <= a.tau,
            w,
            "algorithm.fragments",
            f"must lie in [1, algorithm.tau] = [1, {a.tau}]",
            a.fragments,
        )
        _require(not a.shard, w, "algorithm.fragments", "cannot be combined with algorithm.shard: true", a.fragments)
        _require(
            a.optimizer_state == "keep",
            w,
            "algorithm.fragments",
            f"needs algorithm.optimizer_state keep (a fragment cannot {a.optimizer_state} the whole base "
            "optimizer's state)",
            a.fragments,
        )
    _check(w, check.check_choice, a.sync_dtype, "algorithm.sync_dtype", choices=SYNC_DTYPES)
    if a.sync_dtype not in (None, "float32"):
        _require(
            a.name in SLOW_STEP_ALGORITHMS,
            w,
            "algorithm.sync_dtype",
            f"compresses a slow step: it needs algorithm.name {slow} (name is {a.name})",
            a.sync_dtype,
        )
        for key in ("shard", "overlap_slow"):
            _require(
                not getattr(a, key),
                w,
                "algorithm.sync_dtype",
                f"cannot be combined with algorithm.{key}: true",
                a.sync_dtype,
            )


def _validate_elastic(cfg: Config) -> None:
    """The ``elastic:`` section, and the keys elastic membership cannot run with (naming both keys)."""
    w, e = cfg.source, cfg.elastic
    for key in ("heartbeat", "dead_after", "timeout"):
        _require(getattr(e, key) > 0, w, f"elastic.{key}", "must be a positive number of seconds", getattr(e, key))
    _require(
        e.dead_after >= 2 * e.heartbeat,
        w,
        "elastic.dead_after",
        f"must be at least twice elastic.heartbeat ({e.heartbeat:g}), or live members are declared dead",
        e.dead_after,
    )
    for key in ("history", "sync_every"):
        if getattr(e, key) is not None:
            _check(w, check.check_int, getattr(e, key), f"elastic.{key}", low=1, hint=" (null: the default)")
    if not e.enabled:
        return
    a = cfg.algorithm
    _require(
        a.name in ("slowmo", "diloco", "decentralized", "local_sgd"),
        w,
        "algorithm.name",
        "cannot run with elastic.enabled: true (elastic membership runs slowmo, diloco, decentralized and "
        "local_sgd; allreduce and lookahead on several ranks use DistributedDataParallel, whose group is fixed)",
        a.name,
    )
    for path, refused, why in ELASTIC_REFUSED:
        section, _, key = path.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, key)
        if value in refused if isinstance(refused, tuple) else value == refused:
            raise ConfigError(f"{w}: {path} ({short_repr(value)}) cannot be combined with elastic.enabled: true: {why}")


def validate(cfg: Config) -> Config:
    """Check ranges and combinations; return ``cfg``. Does not touch the file system or import torchvision.

    Old values (``algorithm.name: gossip``) are first replaced by their new names, with a DeprecationWarning.
    """
    _rename_values(cfg)
    w = cfg.source
    _check(w, check.check_choice, cfg.model.name, "model.name", choices=MODELS)
    _check(w, check.check_int, cfg.model.num_classes, "model.num_classes", low=2)
    d = cfg.data
    _check(w, check.check_choice, d.name, "data.name", choices=DATASETS)
    _require(0.0 < d.test_fraction < 1.0, w, "data.test_fraction", "must lie in (0, 1)", d.test_fraction)
    _check(w, check.check_int, d.num_workers, "data.num_workers", low=0)
    _require(d.name == "digits" or bool(d.path), w, "data.path", f"is required for {d.name}", d.path)
    _require(
        (cfg.model.name in DIGITS_MODELS) == (d.name == "digits"),
        w,
        "model.name",
        f"{' and '.join(DIGITS_MODELS)} go with data.name digits, and only they (data.name is {d.name!r})",
        cfg.model.name,
    )
    o = cfg.optim
    _check(w, check.check_choice, o.name, "optim.name", choices=OPTIMIZERS)
    _require(math.isfinite(o.lr) and o.lr > 0, w, "optim.lr", "must be > 0", o.lr)
    _require(0.0 <= o.momentum < 1.0, w, "optim.momentum", "must lie in [0, 1)", o.momentum)
    _require(
        not o.nesterov or (o.name == "sgd" and o.momentum > 0),
        w,
        "optim.nesterov",
        "needs optim.name sgd and momentum > 0",
        o.nesterov,
    )
    _require(o.weight_decay >= 0.0, w, "optim.weight_decay", "must be >= 0", o.weight_decay)
    _check(w, check.check_choice, o.schedule, "optim.schedule", choices=SCHEDULES)
    _require(
        all(m >= 0 for m in o.milestones) and list(o.milestones) == sorted(o.milestones),
        w,
        "optim.milestones",
        "must be non-negative and increasing",
        o.milestones,
    )
    _require(
        o.milestones_in in ("steps", "epochs"), w, "optim.milestones_in", "must be steps or epochs", o.milestones_in
    )
    _require(0.0 < o.decay <= 1.0, w, "optim.decay", "must lie in (0, 1]", o.decay)
    _check(w, check.check_int, o.warmup_steps, "optim.warmup_steps", low=0)
    a = cfg.algorithm
    _check(w, check.check_choice, a.name, "algorithm.name", choices=ALGORITHMS)
    _check(w, check.check_tau, a.tau, "algorithm.tau")
    if not _validate_outer(cfg):
        # alpha is Lookahead's slow step size or SlowMo's slow learning rate; both (0, 1] here (no max_alpha key)
        alpha_check = check.check_lookahead_alpha if a.name == "lookahead" else check.check_slow_alpha
        _check(w, alpha_check, a.alpha, "algorithm.alpha")
        _check(w, check.check_beta, a.beta, "algorithm.beta")
    _check(w, check.check_optimizer_state, a.optimizer_state, "algorithm.optimizer_state")
    _require(
        not a.overlap or a.name == "decentralized" or (a.name in ("slowmo", "diloco") and bool(a.topology)),
        w,
        "algorithm.overlap",
        f"overlaps gossip: it needs name decentralized, or slowmo or diloco with a topology (name is {a.name}, "
        f"topology {a.topology})",
        a.overlap,
    )
    _require(
        not a.overlap_slow or a.name in ("slowmo", "diloco", "local_sgd", "lookahead"),
        w,
        "algorithm.overlap_slow",
        f"overlaps a slow step: it needs name slowmo, diloco, local_sgd or lookahead (name is {a.name})",
        a.overlap_slow,
    )
    _validate_slow_step_options(cfg)
    _require(
        not (a.overlap_slow and a.shard),
        w,
        "algorithm.overlap_slow",
        "cannot be combined with algorithm.shard: true",
        a.overlap_slow,
    )
    _require(
        a.name != "decentralized" or bool(a.topology),
        w,
        "algorithm.topology",
        "is required for decentralized",
        a.topology,
    )
    _require(
        (cfg.steps is None) != (cfg.epochs is None),
        w,
        "steps/epochs",
        "exactly one must be set (set the other to null)",
        (cfg.steps, cfg.epochs),
    )
    if cfg.steps is not None:
        _check(w, check.check_int, cfg.steps, "steps", low=1)
    _require(cfg.epochs is None or cfg.epochs > 0, w, "epochs", "must be > 0", cfg.epochs)
    _check(w, check.check_int, cfg.batch_size, "batch_size", low=1)
    _check(w, check.check_int, cfg.log_every, "log_every", low=1)
    _check(w, check.check_int, cfg.eval_every, "eval_every", low=0, hint=" (0: only at the end)")
    _check(w, check.check_int, cfg.checkpoint_every, "checkpoint_every", low=0, hint=" (0: none)")
    _require(
        not cfg.resume or bool(cfg.out_dir), w, "resume", "needs out_dir (the run directory to resume)", cfg.resume
    )
    _require(cfg.backend in ("auto", "gloo", "nccl"), w, "backend", "must be auto, gloo or nccl", cfg.backend)
    _require(cfg.device in ("auto", "cpu", "cuda"), w, "device", "must be auto, cpu or cuda", cfg.device)
    _require(cfg.timeout_s > 0, w, "timeout_s", "must be > 0", cfg.timeout_s)
    _validate_elastic(cfg)
    _require(cfg.debug.step_sleep >= 0, w, "debug.step_sleep", "must be >= 0 seconds", cfg.debug.step_sleep)
    if cfg.debug.nan_step is not None:
        _check(w, check.check_int, cfg.debug.nan_step, "debug.nan_step", low=0)
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
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}: not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: malformed YAML: {exc}") from None
        except RecursionError:
            raise ConfigError(f"{p}: malformed YAML: nested too deeply") from None
        except ValueError as exc:  # a scalar YAML cannot convert, e.g. an integer of more than 4300 digits
            raise ConfigError(f"{p}: malformed YAML: {exc}") from None
        _fill(cfg, data or {}, str(p), "", cfg.deprecations, cfg.given)
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
        out[name] = (
            to_dict(value) if dataclasses.is_dataclass(value) else (list(value) if isinstance(value, list) else value)
        )
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
