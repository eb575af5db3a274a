"""Topologies: a YAML file (or mapping) -> a validated :class:`Topology`.

Length: over 500 lines because the whole validator of the YAML format is here, every key's rule
beside its key-path error and its size limits; the command line, report and plot are in topology_cli.

A topology is a mixing :class:`~lookahead_dist.mixing.Schedule` (P_0, P_1, ...,
column j = the weights agent j takes, X_{k+1} = (X_k - G_k) P_k, paper eq. 4),
the role of every agent (``fast``: computes gradients; ``slow``: passive) and
its placement (the rank that hosts it).

YAML format
-----------
Every key is optional except one source of matrices (exactly one of
``generator``, ``matrix``, ``edges``, ``schedule``); an unknown key is an error::

    name: ring                  # default: the file stem
    description: a ring         # free text
    agents: 4                   # number of agents n; default: len(placement), or the
                                # world size (one agent per rank), or the source's own size
    generator: ring             # a built-in name, or a mapping with its parameters:
                                #   {type: torus, rows: 3, cols: 3}
                                #   {type: two_agent, alpha: 0.5, tau: 5}
                                #   {type: hierarchical, nodes: 2, per_node: 2, inter: ring}
    # matrix: [[0.5, 0.5], [0.5, 0.5]]   explicit P: column j = the weights agent j takes
    # nodes: 4                           with edges: the number of agents (optional)
    # edges: [[0, 1], [1, 2]]            or [[src, dst, weight], ...]
    #                                    or [{from: 0, to: 1, weight: 0.3}, ...]
    # undirected: true                   with edges: every edge also goes dst -> src
    # schedule:                          time-varying: a list of phases, each with one of
    #   - {generator: ring, repeat: 3}   generator / matrix / edges (+ nodes, undirected),
    #   - {matrix: [[...]], name: sync}  and optional repeat (default 1) and name
    push_sum: false             # true: matrices are row-stochastic (sum-preserving)
    allow_no_consensus: false   # true: accept a period consensus rate >= 1 (e.g. only local steps)
    roles: [fast, fast, slow]   # default all fast (two_agent: [fast, slow]); or {slow: [4]}
                                # (a mapping lists agents per role; unlisted agents are fast)
    placement: [0, 1, 2]        # agent -> rank; default agent i on rank i

Edges. An edge (i -> j, w) means agent j takes weight w from agent i:
P[i, j] = w, and P[j, j] = 1 - (sum of j's incoming weights) (an error if
negative). Edges are all weighted or all unweighted; without weights, each
receiver j gives 1/(in_degree(j) + 1) to itself and to each in-neighbour. An
explicit self-loop [j, j, w] sets P[j, j] = w, and column j must then sum to 1.
With ``push_sum: true`` an edge (i -> j, w) means i sends the fraction w of its
mass to j: P[i, j] = w, P[i, i] = 1 - (sum of i's outgoing weights), or
1/(out_degree(i) + 1) each without weights.

Schedules. A generator with several phases (e.g. two_agent, hierarchical)
inserts all of them; ``repeat: N`` repeats that whole sub-sequence N times.
The schedule must reach consensus: its period consensus rate rho(Pi - a 1^T)
(Pi the period product) must be < 1, unless ``allow_no_consensus: true``.

World size. With the default placement n equals the world size; with an
explicit placement the world size is max(placement) + 1 and every rank
0 .. W-1 must host an agent. ``load(..., world_size=W)`` checks W against it.

Every invalid input raises :class:`TopologyError` naming the file, the key
path (e.g. ``schedule[1].matrix[2][0]``, ``generator.rows``) and the value.

>>> t = from_mapping({"generator": {"type": "two_agent", "alpha": 0.5, "tau": 2}})
>>> t.n, t.roles, t.schedule.period, round(t.schedule.consensus_rate(), 12)
(2, ('fast', 'slow'), 2, 0.0)

Command line: ``python -m lookahead_dist.topology FILE [--world-size N] [--plot out.png]``
prints every phase, its invariant vector, consensus rates and the messages per rank
(:mod:`lookahead_dist.topology_cli`).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from lookahead_dist.errors import MixingError, TopologyError
from lookahead_dist.generators import GENERATORS, MAX_AGENTS, MAX_PERIOD, edge_phase, generator_names, short_repr
from lookahead_dist.mixing import DEFAULT_TOL, MAX_NONZEROS, Phase, Schedule, check_phase, weight_problem

__all__ = ["Topology", "builtin", "from_mapping", "load", "main", "plot", "report"]

#: A period consensus rate >= 1 - this is "no consensus". Rates come from closed forms or eigenvalues accurate
#: to some 1e-14, and a ring of MAX_AGENTS = 2^19 agents has 1 - 4.8e-11, which must still count as consensus.
NO_CONSENSUS_TOL = 1e-11
#: The most phases a schedule may list, after a multi-phase generator's ``repeat`` copies are expanded.
#: Loading checks every phase and applies each in the consensus rate; hand-written schedules have a few
#: phases, one_peer_exponential log2(n), so 4096 is generous and still keeps a file like
#: ``{generator: two_agent, repeat: 1000000000}`` from building a billion phases.
MAX_PHASES = 4096
#: The most rows of a dense ``matrix:``: n^2 numbers that PyYAML parses as Python objects (4 million at 2048,
#: some 40 s and 1 GB), checked with the dense checks as written. Larger topologies use a generator or ``edges``.
MAX_MATRIX_AGENTS = 2048
#: The most stored entries the distinct phases of one schedule may hold together (MAX_NONZEROS = 2^26,
#: 800 MB): a long schedule of large phases is refused when it reaches this, not killed for memory.
MAX_SCHEDULE_NONZEROS = MAX_NONZEROS
_TOP_KEYS = (
    "name",
    "description",
    "agents",
    "generator",
    "matrix",
    "nodes",
    "edges",
    "undirected",
    "schedule",
    "push_sum",
    "allow_no_consensus",
    "roles",
    "placement",
)
_PHASE_KEYS = ("generator", "matrix", "edges", "nodes", "undirected", "repeat", "name")
_SOURCES = ("generator", "matrix", "edges", "schedule")
_NOVALUE = object()


@dataclass(frozen=True)
class Topology:
    """A validated schedule with the role and the rank of every agent."""

    name: str
    schedule: Schedule
    roles: tuple[str, ...]
    placement: tuple[int, ...]
    source: str = "<mapping>"
    description: str = ""

    @property
    def n(self) -> int:
        return self.schedule.n

    @property
    def world_size(self) -> int:
        return max(self.placement) + 1

    @property
    def push_sum(self) -> bool:
        return self.schedule.push_sum

    @property
    def fast_agents(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.roles) if r == "fast")

    @property
    def slow_agents(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.roles) if r == "slow")

    def agents_on(self, rank: int) -> tuple[int, ...]:
        """The agents hosted by ``rank``, in index order."""
        return tuple(i for i, r in enumerate(self.placement) if r == rank)

    def fingerprint(self) -> str:
        """sha256 of the schedule's fingerprint, the roles and the placement."""
        text = f"{self.schedule.fingerprint()};roles={','.join(self.roles)};placement={self.placement}"
        return hashlib.sha256(text.encode()).hexdigest()


# -- parsing helpers ----------------------------------------------------------------


class _Ctx:
    def __init__(self, source: str):
        self.source = source

    def err(self, path: str, rule: str, value=_NOVALUE) -> TopologyError:
        got = "" if value is _NOVALUE else f" (got {short_repr(value)})"
        return TopologyError(f"{self.source}: {path or '(top level)'}: {rule}{got}")

    def keys(self, mapping: dict, allowed, path: str) -> None:
        for k in mapping:
            if k not in allowed:
                raise self.err(_join(path, str(k)), f"unknown key; allowed keys: {', '.join(allowed)}", k)

    def as_int(self, value, path: str, low: int = 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise self.err(path, f"must be an integer >= {low}", value)
        return value

    def as_bool(self, value, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.err(path, "must be true or false", value)
        return value

    def as_str(self, value, path: str) -> str:
        if not isinstance(value, str):
            raise self.err(path, "must be a string", value)
        return value


def _join(path: str, key: str) -> str:
    return key if not path else f"{path}{key}" if key.startswith("[") else f"{path}.{key}"


def _number(ctx: _Ctx, x, path: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ctx.err(path, "a weight must be a number", x)
    problem = weight_problem(x)  # the rule of mixing's matrix checks, named here by key path
    if problem:
        raise ctx.err(path, problem, x)
    return float(x)


def _matrix(ctx: _Ctx, value, path: str) -> np.ndarray:
    if not isinstance(value, list) or not value:
        raise ctx.err(path, "must be a non-empty list of rows", value)
    n = len(value)
    if n > MAX_MATRIX_AGENTS:
        raise ctx.err(
            path,
            f"{n} rows: a dense matrix of more agents than the limit MAX_MATRIX_AGENTS = {MAX_MATRIX_AGENTS} "
            "(use a generator or edges)",
        )
    for i, row in enumerate(value):
        p = f"{path}[{i}]"
        if not isinstance(row, list):
            raise ctx.err(p, "every row must be a list of numbers", row)
        first = len(value[0]) if isinstance(value[0], list) else n
        if len(row) != first:
            raise ctx.err(p, f"ragged matrix: row {i} has {len(row)} entries but row 0 has {first}", row)
        if len(row) != n:
            raise ctx.err(path, f"the matrix must be square: {n} rows of {len(row)} entries")
        for j, x in enumerate(row):
            _number(ctx, x, f"{p}[{j}]")
    return np.array(value, dtype=np.float64)


def _edges(ctx: _Ctx, spec: dict, path: str, n: Optional[int], why: str, push_sum: bool) -> Phase:
    epath = _join(path, "edges")
    raw = spec["edges"]
    if not isinstance(raw, list):
        raise ctx.err(epath, "must be a list of edges [src, dst] / [src, dst, weight] / {from, to, weight}", raw)
    if "nodes" in spec:
        nodes = ctx.as_int(spec["nodes"], _join(path, "nodes"))
        if nodes > MAX_AGENTS:
            raise ctx.err(_join(path, "nodes"), f"more agents than the limit MAX_AGENTS = {MAX_AGENTS}", nodes)
        if n is not None and nodes != n:
            raise ctx.err(_join(path, "nodes"), f"does not match the {n} agents ({why})", nodes)
        n = nodes
    edges = []  # (src, dst, weight or None, path)
    for k, e in enumerate(raw):
        p = f"{epath}[{k}]"
        if isinstance(e, dict):
            ctx.keys(e, ("from", "to", "weight"), p)
            if "from" not in e or "to" not in e:
                raise ctx.err(p, "an edge mapping needs 'from' and 'to'", e)
            ends = [(e["from"], _join(p, "from")), (e["to"], _join(p, "to"))]
            w, wp = e.get("weight"), _join(p, "weight")
        elif isinstance(e, list) and len(e) in (2, 3):
            ends = [(e[0], f"{p}[0]"), (e[1], f"{p}[1]")]
            w, wp = (e[2] if len(e) == 3 else None), f"{p}[2]"
        else:
            raise ctx.err(p, "an edge is [src, dst], [src, dst, weight] or {from, to, weight}", e)
        ij = [ctx.as_int(v, vp, 0) for v, vp in ends]
        for v, vp in ends:
            if v >= MAX_AGENTS:
                raise ctx.err(vp, f"node index beyond the limit of MAX_AGENTS = {MAX_AGENTS} agents", v)
        if w is not None:
            w = _number(ctx, w, wp)
        if edges and (w is None) != (edges[0][2] is None):
            raise ctx.err(
                p,
                f"all edges must be weighted or none is ({epath}[0] "
                f"{'has no' if edges[0][2] is None else 'has a'} weight)",
                e,
            )
        edges.append((ij[0], ij[1], w, ends))
    if n is None:
        if not edges:
            raise ctx.err(epath, "no edges and no 'nodes': the number of agents is unknown", raw)
        n = 1 + max(max(i, j) for i, j, _, _ in edges)
    for _i, _j, _w, ends in edges:
        for v, vp in ends:
            if v >= n:
                raise ctx.err(vp, f"node index out of range 0 .. {n - 1} ({n} agents)", v)
    undirected = ctx.as_bool(spec.get("undirected", False), _join(path, "undirected"))
    try:
        return edge_phase(n, [e[:3] if e[2] is not None else e[:2] for e in edges], push_sum, undirected)
    except TopologyError as exc:
        raise ctx.err(epath, getattr(exc, "rule", str(exc))) from None


def _generator(ctx: _Ctx, spec, path: str, n: Optional[int], why: str):
    if isinstance(spec, str):
        name, params, tpath = spec, {}, path
    elif isinstance(spec, dict):
        tpath = _join(path, "type")
        if "type" not in spec:
            raise ctx.err(tpath, f"missing: a generator mapping needs 'type' (one of {generator_names()})")
        name, params = spec["type"], {k: v for k, v in spec.items() if k != "type"}
        for k in params:
            if not isinstance(k, str):
                raise ctx.err(_join(path, str(k)), "unknown key", k)
    else:
        raise ctx.err(path, "must be a generator name or a mapping {type: name, ...}", spec)
    if not isinstance(name, str) or name not in GENERATORS:
        raise ctx.err(tpath, f"unknown generator; built-ins: {', '.join(generator_names())}", name)
    gen = GENERATORS[name]
    try:
        phases = gen.phases(n, **params)
    except TopologyError as exc:
        key, rule = getattr(exc, "key", None), getattr(exc, "rule", str(exc))
        where = _join(path, key) if key in params else path
        rule = f"{name}: {rule}" + (f" (n = {n} from {why})" if n is not None else "")
        raise ctx.err(where, rule, *(() if getattr(exc, "value", None) is None else (exc.value,))) from None
    return phases, gen.roles


def _source(ctx: _Ctx, spec: dict, path: str, n: Optional[int], why: str, push_sum: bool):
    """Phases (and default roles) from the one source key of ``spec``: generator, matrix or edges."""
    keys = [k for k in ("generator", "matrix", "edges") if k in spec]
    if len(keys) != 1:
        raise ctx.err(path, f"give exactly one of generator, matrix, edges (got {keys or 'none'})")
    for k in ("nodes", "undirected"):
        if k in spec and "edges" not in spec:
            raise ctx.err(_join(path, k), "only allowed together with edges", spec[k])
    key = keys[0]
    spath = _join(path, key)
    roles = None
    if key == "generator":
        phases, roles = _generator(ctx, spec[key], spath, n, why)
    elif key == "matrix":
        phases = [Phase(_matrix(ctx, spec[key], spath))]
    else:
        phases = [_edges(ctx, spec, path, n, why, push_sum)]
    for ph in phases:
        m = ph.n
        if n is not None and m != n:
            raise ctx.err(spath, f"gives {m} agents but the topology has {n} ({why})")
        try:
            check_phase(ph, DEFAULT_TOL, spath, push_sum)
        except MixingError as exc:
            raise TopologyError(f"{ctx.source}: {exc}") from None
    return phases, roles


def _schedule(ctx: _Ctx, raw, n: Optional[int], why: str, push_sum: bool):
    if not isinstance(raw, list):
        raise ctx.err("schedule", "must be a list of phases", raw)
    if not raw:
        raise ctx.err("schedule", "empty schedule: give at least one phase", raw)
    if len(raw) > MAX_PHASES:
        raise ctx.err("schedule", f"{len(raw)} phases exceed the limit MAX_PHASES = {MAX_PHASES}")
    phases, roles, period, stored = [], None, 0, 0
    for k, entry in enumerate(raw):
        p = f"schedule[{k}]"
        if not isinstance(entry, dict):
            raise ctx.err(p, "a phase must be a mapping with one of generator, matrix, edges", entry)
        ctx.keys(entry, _PHASE_KEYS, p)
        repeat = ctx.as_int(entry.get("repeat", 1), _join(p, "repeat"))
        if repeat > MAX_PERIOD:
            raise ctx.err(_join(p, "repeat"), f"exceeds the longest period MAX_PERIOD = {MAX_PERIOD} steps", repeat)
        name = ctx.as_str(entry.get("name", ""), _join(p, "name"))
        sub, sub_roles = _source(ctx, entry, p, n, why, push_sum)
        stored += sum(0 if ph.averaging is not None else ph.nnz for ph in sub)
        if stored > MAX_SCHEDULE_NONZEROS:
            raise ctx.err(
                p,
                f"the phases so far store {stored} entries, beyond the limit MAX_SCHEDULE_NONZEROS = "
                f"{MAX_SCHEDULE_NONZEROS} (repeat a phase instead of listing it again)",
            )
        if n is None:
            n, why = sub[0].n, "schedule[0]"
        roles = roles or sub_roles
        period += repeat * sum(ph.repeat for ph in sub)
        if period > MAX_PERIOD:
            raise ctx.err(
                _join(p, "repeat"),
                f"the period reaches {period} steps, beyond the longest period MAX_PERIOD = {MAX_PERIOD}",
                repeat,
            )
        if len(sub) == 1:
            phases.append(Phase(sub[0], sub[0].repeat * repeat, name or sub[0].name))
        elif len(phases) + len(sub) * repeat > MAX_PHASES:
            raise ctx.err(
                _join(p, "repeat"),
                f"{repeat} copies of {len(sub)} phases exceed the limit MAX_PHASES = {MAX_PHASES}",
                repeat,
            )
        else:
            phases.extend(sub * repeat)
    return phases, roles


def _roles(ctx: _Ctx, raw, n: int, default) -> tuple:
    if raw is None:
        return tuple(default) if default and len(default) == n else ("fast",) * n
    if isinstance(raw, list):
        if len(raw) != n:
            raise ctx.err("roles", f"lists {len(raw)} roles for {n} agents", raw)
        for i, r in enumerate(raw):
            if r not in ("fast", "slow"):
                raise ctx.err(f"roles[{i}]", "a role is fast or slow", r)
        roles = tuple(raw)
    elif isinstance(raw, dict):
        ctx.keys(raw, ("fast", "slow"), "roles")
        roles = ["fast"] * n
        owner = {}
        for role, agents in raw.items():
            if not isinstance(agents, list):
                raise ctx.err(f"roles.{role}", "must be a list of agent indices", agents)
            for k, i in enumerate(agents):
                ctx.as_int(i, f"roles.{role}[{k}]", 0)
                if i >= n:
                    raise ctx.err(f"roles.{role}[{k}]", f"node index out of range 0 .. {n - 1} ({n} agents)", i)
                if owner.setdefault(i, role) != role:
                    raise ctx.err(f"roles.{role}[{k}]", f"agent {i} is listed as both fast and slow", i)
                roles[i] = role
        roles = tuple(roles)
    else:
        raise ctx.err("roles", "must be a list of fast/slow or a mapping {fast: [...], slow: [...]}", raw)
    if "fast" not in roles:
        raise ctx.err("roles", "at least one agent must be fast", raw)
    return roles


def _placement(ctx: _Ctx, raw, n: int, world_size: Optional[int], n_path: str) -> tuple:
    if raw is None:
        if world_size is not None and world_size != n:
            raise ctx.err(
                n_path,
                f"{n} agents on the default placement (agent i on rank i) need world size {n}, "
                f"but the world size is {world_size}",
            )
        return tuple(range(n))
    if not isinstance(raw, list) or len(raw) != n:
        raise ctx.err("placement", f"must list one rank for each of the {n} agents", raw)
    for i, r in enumerate(raw):
        ctx.as_int(r, f"placement[{i}]", 0)
        if world_size is not None and r >= world_size:
            raise ctx.err(f"placement[{i}]", f"rank out of range 0 .. {world_size - 1} (world size {world_size})", r)
        if r >= n:  # every rank hosts an agent, so n agents fill at most ranks 0 .. n - 1
            raise ctx.err(f"placement[{i}]", f"rank out of range 0 .. {n - 1}: {n} agents leave a rank empty", r)
    W = max(raw) + 1
    empty = sorted(set(range(W)) - set(raw))
    if empty:
        raise ctx.err("placement", f"ranks {empty} host no agent; every rank 0 .. {W - 1} must host one", raw)
    if world_size is not None and world_size != W:
        raise ctx.err("placement", f"uses {W} ranks but the world size is {world_size}", raw)
    return tuple(raw)


def from_mapping(mapping: dict, source: str = "<mapping>", world_size: Optional[int] = None) -> Topology:
    """Validate a topology mapping (the YAML format of this module) and build a :class:`Topology`."""
    ctx = _Ctx(source)
    if not isinstance(mapping, dict):
        raise ctx.err("", "a topology must be a mapping of keys (see the format in lookahead_dist.topology)", mapping)
    ctx.keys(mapping, _TOP_KEYS, "")
    if world_size is not None and (isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1):
        raise ctx.err("world_size", "must be an integer >= 1", world_size)
    sources = [k for k in _SOURCES if k in mapping]
    if len(sources) != 1:
        raise ctx.err("", f"give exactly one of {', '.join(_SOURCES)} (got {sources or 'none'})")
    push_sum = ctx.as_bool(mapping.get("push_sum", False), "push_sum")
    allow = ctx.as_bool(mapping.get("allow_no_consensus", False), "allow_no_consensus")
    description = ctx.as_str(mapping.get("description", ""), "description")
    n, why, n_key = None, "", ""
    if "agents" in mapping:
        n, why, n_key = ctx.as_int(mapping["agents"], "agents"), f"agents: {mapping['agents']}", "agents"
    elif isinstance(mapping.get("placement"), list):
        n, why, n_key = len(mapping["placement"]), "the length of placement", "placement"
    elif isinstance(mapping.get("roles"), list):
        n, why, n_key = len(mapping["roles"]), "the length of roles", "roles"
    elif world_size is not None and "placement" not in mapping:
        n, why, n_key = world_size, f"world size {world_size}", "world_size"
    if n is not None and n > MAX_AGENTS:
        raise ctx.err(n_key, f"{n} agents ({why}) exceed the limit MAX_AGENTS = {MAX_AGENTS}")
    if sources[0] == "schedule":
        for k in ("nodes", "undirected"):
            if k in mapping:
                raise ctx.err(k, "only allowed together with edges", mapping[k])
        phases, role_hint = _schedule(ctx, mapping["schedule"], n, why, push_sum)
    else:
        phases, role_hint = _source(ctx, mapping, "", n, why, push_sum)
    gen = mapping.get("generator")
    default_name = (
        Path(source).stem
        if not source.startswith("<")
        else gen
        if isinstance(gen, str)
        else gen.get("type", "custom")
        if isinstance(gen, dict)
        else "custom"
    )
    name = ctx.as_str(mapping.get("name", default_name), "name")
    try:
        schedule = Schedule(phases, push_sum=push_sum, name=name)
        rate = schedule.consensus_rate()
    except MixingError as exc:
        raise TopologyError(f"{source}: {sources[0]}: {exc}") from None
    n = schedule.n
    if rate >= 1 - NO_CONSENSUS_TOL and not allow:
        raise ctx.err(
            sources[0],
            f"the schedule never reaches consensus: its period consensus rate is {rate:.6g} "
            ">= 1 (no agent is reached by all others over a period); "
            "set allow_no_consensus: true to accept it",
        )
    roles = _roles(ctx, mapping.get("roles"), n, role_hint)
    n_path = "agents" if "agents" in mapping else sources[0]
    placement = _placement(ctx, mapping.get("placement"), n, world_size, n_path)
    return Topology(name, schedule, roles, placement, source, description)


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of keeping the last one."""


def _mapping_no_duplicates(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        except TypeError:
            pass
    return loader.construct_mapping(node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_no_duplicates)


def load(path_or_mapping, world_size: Optional[int] = None) -> Topology:
    """Load a topology from a YAML file path (or a mapping) and validate it.

    ``world_size``: the number of ranks the topology must fit (also the default
    number of agents when the file does not fix it).
    """
    if isinstance(path_or_mapping, dict):
        return from_mapping(path_or_mapping, world_size=world_size)
    path = Path(path_or_mapping)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TopologyError(f"{path}: cannot read the topology file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise TopologyError(f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except RecursionError:
        raise TopologyError(f"{path}: malformed YAML: nested too deeply") from None
    except ValueError as exc:  # a scalar YAML cannot convert, e.g. an integer of more than 4300 digits
        raise TopologyError(f"{path}: malformed YAML: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}: line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise TopologyError(f"{path}{line}: malformed YAML: {problem}") from None
    return from_mapping(data, source=str(path), world_size=world_size)


def builtin(name: str, world_size: Optional[int] = None, **params) -> Topology:
    """The topology of one built-in generator, e.g. ``builtin("torus", rows=3, cols=3)``."""
    return from_mapping({"generator": {"type": name, **params}}, source=f"<builtin {name}>", world_size=world_size)


# -- command line ----------------------------------------------------------------------


def main(argv=None) -> int:
    """``lookahead-topology FILE [--world-size N] [--plot out.png]``: see :mod:`lookahead_dist.topology_cli`."""
    from lookahead_dist.topology_cli import main as cli_main

    return cli_main(argv)


def report(t: Topology) -> str:
    """A human-readable description of a topology: :func:`lookahead_dist.topology_cli.report`."""
    from lookahead_dist.topology_cli import report as cli_report

    return cli_report(t)


def plot(t: Topology, path) -> None:
    """Draw the graph of every phase into a PNG file: :func:`lookahead_dist.topology_cli.plot`."""
    from lookahead_dist.topology_cli import plot as cli_plot

    cli_plot(t, path)


if __name__ == "__main__":
    sys.exit(main())
