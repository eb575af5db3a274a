"""Bad input, fuzzed: topology mappings and files, run configs and ``--set`` overrides.

hypothesis mixes valid-looking structures (column- and row-stochastic matrices, generator calls,
schedules with repeats, roles, placements) with garbage (NaN, inf, negative, huge or tiny entries,
ragged rows, wrong shapes, unknown keys, wrong types, sizes that do not fit), so that the checks
deep inside the loaders run, not only the unknown-key check at the top. Every example must either
load, or raise the library's own error (a LookaheadDistError) with a message; any other exception
fails the test, and so does an example that runs past a time limit.

The examples are derandomized and no example database is kept, so every run tries the same inputs.
``pytest -s tests/test_fuzz.py`` prints how many examples each test ran.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import os
import random
import shutil
import signal
import struct
import tempfile
import time
import typing
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lookahead_dist import generators, topology
from lookahead_dist.errors import LookaheadDistError
from lookahead_dist.train import config as run_config

TARGET_EXAMPLES = 2000  # over the whole file
HANG_S = 10.0  # one example longer than this is a hang, whatever the machine's load
COUNTS: dict[str, int] = {}
QUOTAS: dict[str, int] = {}
# Files go to memory where it exists: on this machine a write and a read on disk cost 6 ms, 0.1 ms in /dev/shm.
_TMP = Path(tempfile.mkdtemp(prefix="lookahead-fuzz-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))
atexit.register(shutil.rmtree, _TMP, True)
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's dumper is four times faster
DEEP = 700  # nesting that exhausts the interpreter's recursion limit inside PyYAML's recursive composer


def fuzz_settings(n: int, name: str):
    QUOTAS[name] = n
    return settings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=2000,  # ms; generous on a loaded 2-core machine, the alarm below catches real hangs
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


@contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise TimeoutError(f"example ran past {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def loads_or_library_error(name: str, call, *args, **kwargs):
    """Run ``call``; a LookaheadDistError with a message is fine, any other exception propagates."""
    COUNTS[name] = COUNTS.get(name, 0) + 1
    with time_limit(HANG_S):
        try:
            return call(*args, **kwargs)
        except LookaheadDistError as exc:
            assert str(exc).strip(), f"{type(exc).__name__} without a message"
            assert len(str(exc)) < 20_000, f"a {len(str(exc))}-character message: {str(exc)[:200]}..."
            return exc


# -- building blocks -----------------------------------------------------------------------
#
# hypothesis draws a seed and a few structural choices (which source, which corruption); the bulk of each
# input (matrix entries, edge lists, parameter values) comes from random.Random(seed). One draw per value
# would cost hypothesis about 0.2 ms each, and the whole file has a 15 s budget for 2,000+ examples.

HUGE_INT = 10**400  # beyond float64
BAD_NUMBERS = [
    math.nan,
    math.inf,
    -math.inf,
    -0.5,
    -1e-300,
    1e308,
    -1e308,
    5e-324,
    1e-300,
    2.0,
    HUGE_INT,
    -HUGE_INT,
    10**9,
    True,
    None,
    "0.5",
    "nan",
    [],
    [0.5],
    {},
]
GARBAGE = BAD_NUMBERS + [
    0,
    1,
    3,
    -7,
    0.3,
    "",
    "x",
    "ring",
    "fast",
    [[]],
    [1, 2, 3],
    {"a": 1},
    {1: [2]},
    [[0.5, 0.5]],
    ("tuple",),
    b"bytes",
    2**63,
    -(2**63) - 1,
]
SIZES = [0, -1, 10**9, 10**30, HUGE_INT, 2.0, True, "4", None]
SEEDS = st.integers(0, 2**32 - 1)
ODD_CHARS = ":-[]{},&*!|>'\"#%@`?\t\n 0123456789.eE\u00e9\u2028\ufeff\x00"


def rand_float(rng):
    """Any float64 bit pattern (NaNs, infinities, subnormals), or one from a list of awkward values."""
    if rng.random() < 0.5:
        return struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
    return rng.choice([0.0, -0.0, 0.5, 1.0, 1 / 3, 1e-12, 5e-324, 1e308, -1e308, math.nan, math.inf, -math.inf])


def rand_text(rng, k=4):
    return "".join(rng.choice(ODD_CHARS + "abcxyz") for _ in range(rng.randint(0, k)))


def rand_garbage(rng):
    r = rng.random()
    if r < 0.6:
        return rng.choice(GARBAGE)
    if r < 0.8:
        return rand_float(rng)
    if r < 0.9:
        return rand_text(rng)
    return [rand_garbage(rng) for _ in range(rng.randint(0, 3))]


def rand_size(rng, n):
    r = rng.random()
    return n if r < 0.6 else rng.randint(1, 8) if r < 0.8 else rng.choice(SIZES)


def stochastic(rng, n):
    """A column-stochastic n x n matrix as nested lists, sparse or dense, sometimes with tiny entries."""
    raw = np.array([rng.choice([0.0, 0.0, 1.0, 2.0, 3.0, 1e-300, 5e-324, 1e-12]) for _ in range(n * n)])
    raw = raw.reshape(n, n) + np.eye(n)  # no zero column
    return (raw / raw.sum(axis=0)).tolist()


MATRIX_FAULTS = [
    "valid",
    "valid",
    "valid",
    "transpose",
    "entry",
    "entry",
    "ragged",
    "extra_row",
    "drop_row",
    "row_not_list",
    "not_list",
    "empty",
    "scaled",
    "identity",
    "blocks",
]


def rand_matrix(rng, n, fault=None):
    """A stochastic matrix, its transpose (row-stochastic), or one corrupted in one of many ways."""
    P = stochastic(rng, n)
    how = fault or rng.choice(MATRIX_FAULTS)
    i, j = rng.randrange(n), rng.randrange(n)
    if how == "transpose":
        P = np.array(P).T.tolist()
    elif how == "entry":
        P[i][j] = rng.choice(BAD_NUMBERS) if rng.random() < 0.5 else rand_float(rng)
    elif how == "ragged":
        P[i] = P[i][:-1] if rng.random() < 0.5 else P[i] + [0.0]
    elif how == "extra_row":
        P.append([1.0 / n] * n)
    elif how == "drop_row" and n > 1:
        P.pop(i)
    elif how == "row_not_list":
        P[i] = rand_garbage(rng)
    elif how == "not_list":
        P = rand_garbage(rng)
    elif how == "empty":
        P = rng.choice([[], [[]]])
    elif how == "scaled":
        P = (np.array(P) * rng.choice([1e308, 1e-308, 2.0, 0.5, -1.0])).tolist()
    elif how == "identity":
        P = np.eye(n).tolist()
    elif how == "blocks":  # two groups that never hear from each other
        k = rng.randint(1, max(n - 1, 1))
        P = np.zeros((n, n))
        P[:k, :k] = 1.0 / k
        P[k:, k:] = 1.0 / max(n - k, 1)
        P = P.tolist()
    return P


GEN_NAMES = generators.generator_names()
GEN_PARAMS = sorted({p.name for g in generators.GENERATORS.values() for p in g.params})
PARAM_VALUES = [0.0, 0.5, 1.0, 0.25, "ring", "star", "complete", "hypercube", "exponential", "torus", "two_agent"]


def rand_param(rng, n):
    r = rng.random()
    if r < 0.5:
        return rng.choice([n, n, 1, 2, 3, 4, 6])
    if r < 0.7:
        return rng.choice(PARAM_VALUES)
    if r < 0.85:
        return rng.choice(SIZES)
    return rand_garbage(rng)


def rand_generator(rng, n):
    name = rng.choice(GEN_NAMES) if rng.random() < 0.9 else rand_garbage(rng)
    if isinstance(name, str) and rng.random() < 0.3:
        return name
    spec = {rng.choice(GEN_PARAMS + ["type", "bogus", 3]): rand_param(rng, n) for _ in range(rng.randint(0, 3))}
    if rng.random() < 0.9:
        spec["type"] = name
    return spec


def rand_node(rng, n):
    return rng.randrange(n + 1) if rng.random() < 0.9 else rng.choice([-1, 10**9, HUGE_INT, 1.0, True, None, "0"])


def rand_weight(rng):
    return rng.choice([0.1, 0.25, 0.5, 1.0, 1 / 3, 0.0]) if rng.random() < 0.8 else rng.choice(BAD_NUMBERS)


def rand_edge(rng, n):
    r = rng.random()
    if r < 0.4:
        return [rand_node(rng, n), rand_node(rng, n)]
    if r < 0.7:
        return [rand_node(rng, n), rand_node(rng, n), rand_weight(rng)]
    if r < 0.9:
        e = {"from": rand_node(rng, n), "to": rand_node(rng, n)}
        if rng.random() < 0.5:
            e["weight"] = rand_weight(rng)
        if rng.random() < 0.1:
            e[rng.choice(["via", "src", "from"])] = rand_node(rng, n)
        if rng.random() < 0.1:
            e.pop(rng.choice(["from", "to"]))
        return e
    return [rand_node(rng, n) for _ in range(rng.randint(0, 4))] if rng.random() < 0.5 else rand_garbage(rng)


def rand_edges(rng, n):
    if rng.random() < 0.1:
        return rand_garbage(rng)
    weighted = rng.random() < 0.5
    edges = []
    for _ in range(rng.randint(0, 2 * n)):
        w = rng.choice([0.1, 0.25, 0.5, 1.0, 1 / 3, 0.0]) / n if rng.random() < 0.9 else rng.choice(BAD_NUMBERS)
        e = [rng.randrange(n), rng.randrange(n)] + ([w] if weighted else [])
        edges.append(e if rng.random() < 0.9 else rand_edge(rng, n))
    return edges


SOURCES = ["generator", "matrix", "edges", "schedule"]


def rand_source(rng, n, kind, allow_schedule=True):
    """One source of matrices (generator, matrix, edges, or schedule), sometimes two or none."""
    out = {}
    if kind == "schedule" and not allow_schedule:
        kind = rng.choice(SOURCES[:3])
    if kind == "generator":
        out["generator"] = rand_generator(rng, n)
    elif kind == "matrix":
        out["matrix"] = rand_matrix(rng, n)
    elif kind == "edges":
        out["edges"] = rand_edges(rng, n)
        if rng.random() < 0.5:
            out["nodes"] = rand_size(rng, n)
        if rng.random() < 0.5:
            out["undirected"] = rng.random() < 0.5 if rng.random() < 0.9 else rand_garbage(rng)
    else:
        out["schedule"] = (
            [rand_phase(rng, n) for _ in range(rng.randint(0, 4))] if rng.random() < 0.9 else rand_garbage(rng)
        )
    r = rng.random()
    if r < 0.07:  # a second source, or a key that only goes with edges
        out[rng.choice(SOURCES + ["nodes", "undirected"])] = rand_garbage(rng)
    elif r < 0.12:
        out.pop(kind)
    return out


def rand_phase(rng, n):
    if rng.random() < 0.05:
        return rand_garbage(rng)
    p = rand_source(rng, n, rng.choice(SOURCES[:3]), allow_schedule=False)
    if rng.random() < 0.5:
        p["repeat"] = (
            rng.randint(1, 4)
            if rng.random() < 0.8
            else rng.choice([0, -1, 10**6, 10**9, 10**30, HUGE_INT, 1.5, "2", None])
        )
    if rng.random() < 0.25:
        p["name"] = rand_text(rng) if rng.random() < 0.8 else rand_garbage(rng)
    if rng.random() < 0.05:
        p[rng.choice(["bogus", "push_sum", 7])] = rand_garbage(rng)
    return p


def rand_roles(rng, n):
    r = rng.random()
    if r < 0.5:
        length = max(n + rng.choice([0, 0, 0, -1, 1]), 0)
        return [
            rng.choice(["fast", "fast", "slow"]) if rng.random() < 0.95 else rand_garbage(rng) for _ in range(length)
        ]
    if r < 0.85:
        return {
            rng.choice(["fast", "slow", "slow", "medium"]): [rand_node(rng, n) for _ in range(rng.randint(0, 3))]
            for _ in range(rng.randint(0, 2))
        }
    return rand_garbage(rng)


def rand_placement(rng, n):
    if rng.random() < 0.15:
        return rand_garbage(rng)
    ranks = rng.randint(1, n)
    out = [i % ranks for i in range(max(n + rng.choice([0, 0, 0, -1, 1]), 0))]
    if out and rng.random() < 0.25:
        out[rng.randrange(len(out))] = rand_node(rng, n)
    return out


def rand_topology(seed, kind, n, flags):
    """A topology mapping; ``flags`` (bits) says which optional top-level keys it has."""
    rng = random.Random(seed)
    if flags & 1 and rng.random() < 0.1:
        return rand_garbage(rng)
    m = rand_source(rng, n, kind)
    if flags & 2:
        m["agents"] = rand_size(rng, n)
    if flags & 4:
        m["push_sum"] = rng.random() < 0.5 if rng.random() < 0.9 else rand_garbage(rng)
    if flags & 8:
        m["allow_no_consensus"] = rng.random() < 0.5 if rng.random() < 0.9 else rand_garbage(rng)
    if flags & 16:
        m["roles"] = rand_roles(rng, n)
    if flags & 32:
        m["placement"] = rand_placement(rng, n)
    if flags & 64:
        key = rng.choice(["name", "description"])
        m[key] = rand_text(rng) if rng.random() < 0.8 else rand_garbage(rng)
    if flags & 128 and rng.random() < 0.3:
        m[rng.choice([rand_text(rng), 7, None, "Agents", "matrices"])] = rand_garbage(rng)
    return m


topology_mappings = st.builds(rand_topology, SEEDS, st.sampled_from(SOURCES), st.integers(1, 8), st.integers(0, 255))
world_size = st.one_of(st.none(), st.none(), st.integers(1, 8), st.sampled_from([0, -2, 10**9, True, 2.0, "4"]))


# -- topologies ------------------------------------------------------------------------------


@fuzz_settings(900, "from_mapping")
@given(topology_mappings, world_size)
def test_from_mapping_loads_or_raises_library_error(mapping, ws):
    out = loads_or_library_error("from_mapping", topology.from_mapping, mapping, world_size=ws)
    if isinstance(out, topology.Topology):
        assert len(out.roles) == len(out.placement) == out.n
        assert "fast" in out.roles
        assert set(out.placement) == set(range(out.world_size))
        if ws is not None:
            assert out.world_size == ws


def mutate_text(rng, text: str) -> str:
    how = rng.choice(["keep", "keep", "truncate", "insert", "delete", "tab", "bom"])
    k = rng.randint(0, max(len(text), 1))
    if how == "truncate":
        return text[:k]
    if how == "insert":
        return text[:k] + rand_text(rng) + text[k:]
    if how == "delete":
        return text[:k] + text[k + 3 :]
    if how == "tab":
        return "\t" + text
    if how == "bom":
        return "\ufeff" + text
    return text


def to_file_bytes(rng, data) -> bytes:
    """``data`` dumped as YAML (block or flow style) and perhaps damaged; sometimes raw bytes or YAML-ish noise."""
    r = rng.random()
    if r < 0.08:
        return rng.randbytes(rng.randint(0, 24)) + rng.choice([b"", b"\xff\xfe", b"\xc3", b"\x00"])
    if r < 0.16:
        return "".join(rng.choice(ODD_CHARS + "ab") for _ in range(rng.randint(0, 40))).encode()
    try:
        text = yaml.dump(data, Dumper=DUMPER, default_flow_style=rng.random() < 0.5, allow_unicode=True)
    except yaml.YAMLError:
        text = repr(data)
    return mutate_text(rng, text).encode("utf-8", "surrogatepass")


topology_files = st.builds(lambda seed, t: to_file_bytes(random.Random(seed + 1), t), SEEDS, topology_mappings)


@fuzz_settings(500, "load")
@given(topology_files, world_size)
def test_load_file_loads_or_raises_library_error(data, ws):
    path = _TMP / "topology.yaml"
    path.write_bytes(data)
    out = loads_or_library_error("load", topology.load, path, world_size=ws)
    if isinstance(out, LookaheadDistError):
        assert str(path) in str(out), f"the error does not name the file: {out}"


# Explicit hostile inputs: sizes far past any real topology must be refused up front, naming the size
# and the limit, and without allocating or looping over them.
SIZE_CASES = [
    {"generator": "ring", "agents": 10**9},
    {"generator": {"type": "ring", "n": 10**9}},
    {"generator": {"type": "complete", "n": 10**7}},
    {"generator": {"type": "exponential", "n": 10**6}},
    {"generator": {"type": "one_peer_exponential", "n": 10**9}},
    {"generator": {"type": "hypercube", "n": 2**40}},
    {"generator": {"type": "star", "n": 10**9}},
    {"generator": {"type": "torus", "rows": 10**5, "cols": 10**5}},
    {"generator": {"type": "torus", "rows": 3}, "agents": 3 * 10**8},
    {"generator": {"type": "hierarchical", "nodes": 10**5, "per_node": 10**5}},
    {"generator": {"type": "hierarchical", "nodes": 10**6, "per_node": 1}},
    {"generator": {"type": "two_agent", "tau": 10**30}},
    {"edges": [[0, 10**9]]},
    {"edges": [], "nodes": 10**9},
    {"edges": [{"from": 10**12, "to": 0}]},
    {"matrix": [[1.0] * 10**5] * 10**5},
    {"generator": "ring", "placement": [0] * 10**6},
    {"generator": "ring", "roles": ["fast"] * 10**6},
    {"generator": "ring", "agents": 3, "placement": [0, 1, 10**9]},
    {"schedule": [{"generator": "one_peer_exponential", "repeat": 10**9}], "agents": 4},
    {"schedule": [{"generator": "ring", "repeat": 10**30}], "agents": 3},
    {"schedule": [{"generator": "ring", "repeat": HUGE_INT}], "agents": 3},
    {"schedule": [{"generator": "ring"}] * 10**6, "agents": 3},
]


@pytest.mark.parametrize("case", range(len(SIZE_CASES)))
def test_huge_sizes_are_refused_up_front(case):
    mapping = SIZE_CASES[case]
    t0 = time.perf_counter()
    out = loads_or_library_error("sizes", topology.from_mapping, mapping)
    assert isinstance(out, LookaheadDistError), f"{str(mapping)[:100]} loaded"
    assert time.perf_counter() - t0 < 2.0, f"{str(mapping)[:100]} took {time.perf_counter() - t0:.1f} s"
    assert "MAX_" in str(out) or "out of range" in str(out), str(out)  # names the documented limit


def test_huge_world_size_is_refused_up_front():
    out = loads_or_library_error("sizes", topology.from_mapping, {"generator": "ring"}, world_size=10**9)
    assert isinstance(out, LookaheadDistError)
    assert "1000000000" in str(out) and f"MAX_AGENTS = {generators.MAX_AGENTS}" in str(out), str(out)


BOMB = (
    "[&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], "
    + ", ".join(f"&{b} [{', '.join([f'*{a}'] * 10)}]" for a, b in zip("abcdefg", "bcdefgh"))
    + "]"
)
HOSTILE_YAML = [
    "matrix: " + "[" * DEEP + "]" * DEEP,
    "generator: {type: ring, n: " + "[" * DEEP + "]" * DEEP + "}",
    # an alias bomb: one line that names 10^8 list items through shared references, as a value the loader reads
    "description: " + BOMB + "\ngenerator: ring\n",
    "matrix: " + BOMB + "\n",
    "generator: {type: ring, n: " + BOMB + "}\n",
    "description: &x [*x]\ngenerator: ring\nagents: 3\n",
    "&r [*r]\n",
    "generator: ring\ngenerator: star\n",
    "? [1, 2]\n: 3\n",
    "!!python/object:os.system {}\n",
    "matrix: !!binary aGVsbG8=\n",
    "agents: 2018-01-01\ngenerator: ring\n",
    "agents: " + "9" * 5000 + "\ngenerator: ring\n",
]


@pytest.mark.parametrize("case", range(len(HOSTILE_YAML)))
def test_hostile_yaml_topology(case):
    path = _TMP / "hostile.yaml"
    path.write_text(HOSTILE_YAML[case])
    out = loads_or_library_error("hostile", topology.load, path)
    assert isinstance(out, LookaheadDistError)
    assert str(path) in str(out)


# -- run configs -----------------------------------------------------------------------------


def _config_tree(cls) -> dict:
    """{key: type hint, or a sub-tree for a section} of the run-config dataclasses, read from the code."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: _config_tree(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else hints[f.name]
        for f in dataclasses.fields(cls)
        if not f.metadata.get("internal")
    }


CONFIG_TREE = _config_tree(run_config.Config)
CONFIG_PATHS = [
    (k, s) if isinstance(v, dict) else (k,)
    for k, v in CONFIG_TREE.items()
    for s in (v if isinstance(v, dict) else [None])
]
SECTIONS = [k for k, v in CONFIG_TREE.items() if isinstance(v, dict)]
WORDS = sorted(
    {
        w
        for name in (
            "MODELS",
            "DATASETS",
            "OPTIMIZERS",
            "SCHEDULES",
            "ALGORITHMS",
            "BUFFERS",
            "OPTIMIZER_STATE",
            "OPTIMIZER_STATES",
        )
        for w in getattr(run_config, name, ())
        if isinstance(w, str)
    }
    | {"gossip", "auto", "gloo", "nccl", "cpu", "cuda", "steps", "epochs", "topologies/ring.yaml"}
)


def rand_config_value(rng):
    r = rng.random()
    if r < 0.25:
        return rng.choice(WORDS)
    if r < 0.45:
        return rng.choice([rng.randint(-2, 500), 0.0, 0.05, 0.5, 0.9, 1.0, True, False, None])
    if r < 0.6:
        return rand_float(rng)
    if r < 0.7:
        return [
            rng.uniform(-1, 100) if rng.random() < 0.7 else rng.choice(BAD_NUMBERS) for _ in range(rng.randint(0, 3))
        ]
    return rand_garbage(rng)


def rand_config(seed):
    rng = random.Random(seed)
    if rng.random() < 0.04:
        return rand_config_value(rng)
    out = {}
    for _ in range(rng.randint(0, 6)):
        path = rng.choice(CONFIG_PATHS)
        where = out
        for part in path[:-1]:
            if not isinstance(where.get(part), dict):
                where[part] = {}
            where = where[part]
        where[path[-1]] = rand_config_value(rng)
    r = rng.random()
    if r < 0.15:  # an unknown key, at the top or in a section
        where = out.setdefault(rng.choice(SECTIONS), {}) if rng.random() < 0.5 else out
        if isinstance(where, dict):
            where[rng.choice([rand_text(rng), 7, None, "Lr", "topology"])] = rand_config_value(rng)
    elif r < 0.25:  # a section that is not a mapping
        out[rng.choice(SECTIONS)] = rand_config_value(rng)
    return out


OVERRIDE_TEXTS = [
    "null",
    "~",
    "None",
    "nan",
    "-nan",
    ".nan",
    "inf",
    "-inf",
    ".inf",
    "1e999",
    "1e-999",
    "9" * 400,
    "-1",
    "0",
    "1",
    "0.5",
    "1e-3",
    "true",
    "yes",
    "[]",
    "[1, 2]",
    "[2, 1]",
    "[nan]",
    "{}",
    "{a: 1}",
    "!!python/object:os.system {}",
    "!!binary aGk=",
    "2020-01-01",
    "'",
    "[1,",
    "{a: [}",
    "&a [*a]",
    "a: b: c",
    "\x00",
    "\ufeff1",
    "",
]


def rand_override(rng):
    r = rng.random()
    if r < 0.05:
        return rand_text(rng, 12)
    key = ".".join(rng.choice(CONFIG_PATHS))
    if r < 0.15:
        key = rng.choice([key + ".x", key.split(".")[0], "." + key, key + ".", "", " ", "a..b", key.upper(), "x"])
    sep = "=" if rng.random() < 0.95 else rng.choice(["", ":", "=="])
    r = rng.random()
    text = (
        rng.choice(WORDS)
        if r < 0.3
        else rng.choice(OVERRIDE_TEXTS)
        if r < 0.6
        else str(rng.randint(-5, 1000))
        if r < 0.75
        else repr(rand_float(rng))
        if r < 0.9
        else rand_text(rng, 10)
    )
    return f"{key}{sep}{text}"


def rand_overrides(seed, k):
    rng = random.Random(seed)
    return [rand_override(rng) for _ in range(k)]


config_files = st.builds(lambda seed: to_file_bytes(random.Random(seed + 1), rand_config(seed)), SEEDS)
overrides = st.builds(rand_overrides, SEEDS, st.integers(0, 3))


def _check_config(out):
    if isinstance(out, run_config.Config):
        for name in ("lr", "momentum", "decay", "weight_decay"):
            value = getattr(out.optim, name, 0.0)
            assert isinstance(value, float) and math.isfinite(value), (name, value)
        assert out.steps is None or (isinstance(out.steps, int) and out.steps >= 1)


@fuzz_settings(500, "load_config")
@given(st.one_of(st.none(), config_files), overrides)
def test_load_config_loads_or_raises_library_error(data, overrides):
    path = None
    if data is not None:
        path = _TMP / "run.yaml"
        path.write_bytes(data)
    out = loads_or_library_error("load_config", run_config.load_config, path, overrides)
    _check_config(out)
    if isinstance(out, LookaheadDistError) and path is not None and not overrides:
        assert str(path) in str(out), f"the error does not name the file: {out}"


@fuzz_settings(250, "load_config_overrides")
@given(st.builds(rand_overrides, SEEDS, st.integers(1, 4)))
def test_set_overrides_load_or_raise_library_error(overrides):
    _check_config(loads_or_library_error("load_config_overrides", run_config.load_config, None, overrides))


HOSTILE_CONFIG = [
    "optim: {milestones: " + "[" * DEEP + "]" * DEEP + "}\n",
    "name: " + BOMB + "\n",
    "optim: {lr: " + BOMB + "}\n",
    "optim: {milestones: " + BOMB + "}\n",
    "algorithm: " + BOMB + "\n",
    "name: &x [*x]\n",
    "&r [*r]\n",
    "? [1, 2]\n: 3\n",
    "!!python/object:os.system {}\n",
    "optim: {lr: !!binary aGVsbG8=}\n",
    "steps: 2018-01-01\n",
    "optim: {lr: 1" + "0" * 400 + "}\n",
    "steps: " + "9" * 5000 + "\n",
    "timeout_s: .inf\n",
    "epochs: .nan\nsteps: null\n",
]


@pytest.mark.parametrize("case", range(len(HOSTILE_CONFIG)))
def test_hostile_yaml_config(case):
    path = _TMP / "hostile-run.yaml"
    path.write_text(HOSTILE_CONFIG[case])
    out = loads_or_library_error("hostile", run_config.load_config, path)
    assert isinstance(out, LookaheadDistError)
    assert str(path) in str(out)


@pytest.mark.parametrize("text", ["[" * DEEP + "]" * DEEP, "{a: " * DEEP + "}" * DEEP, "9" * 5000, "&a [*a]"])
def test_hostile_override_values(text):
    for key in ("optim.milestones", "steps"):  # a list and an optional integer: both parse the text as YAML
        out = loads_or_library_error("hostile", run_config.load_config, None, [f"{key}={text}"])
        assert isinstance(out, (LookaheadDistError, run_config.Config))


def test_example_count():
    """Runs last in this file: the fuzz tests above ran their examples, together at least TARGET_EXAMPLES."""
    ran = {name: COUNTS.get(name, 0) for name in QUOTAS}
    print(
        f"\nfuzz examples run: {ran}, total {sum(ran.values())}; fixed cases: "
        f"{sum(v for k, v in COUNTS.items() if k not in QUOTAS)}"
    )
    if not all(ran.values()):
        pytest.skip("only part of this file ran (-k): the total is checked when all of it runs")
    assert sum(QUOTAS.values()) >= TARGET_EXAMPLES
    for name, n in ran.items():
        assert n >= 0.9 * QUOTAS[name], f"{name}: ran {n} of {QUOTAS[name]} examples"
    assert sum(ran.values()) >= TARGET_EXAMPLES
