"""The package's layout: the core is what `import lookahead_dist` loads, and nothing in it depends on a subpackage.

Core: the modules lookahead_dist/*.py. Subpackages (reference, testing,
train, experiments, ...) depend on the core, never the reverse. These tests
read the source with ast or run a fresh interpreter, so they see the tree as
it is on disk.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "lookahead_dist"
TESTS = ROOT / "tests"
MAX_LINES = 500
SUBPACKAGES = sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").is_file())
# Command-line shims that live beside the core but are not loaded by `import lookahead_dist`:
# `python -m lookahead_dist.verify` is a thin command line over lookahead_dist.testing.verify.
CLI_SHIMS = {"verify.py": ("lookahead_dist.testing",)}


COMMANDS = {  # each needs a fresh interpreter; they start together, so the wait is about one torch import
    "import": ["-c", "import json, sys, lookahead_dist; print(json.dumps(sorted(sys.modules)))"],
    "topology": ["-m", "lookahead_dist.topology", "topologies/ring.yaml", "--world-size", "4"],
    "verify --help": ["-m", "lookahead_dist.verify", "--help"],
    "experiments --help": ["-m", "lookahead_dist.experiments", "--help"],
}


@pytest.fixture(scope="module")
def commands() -> dict[str, subprocess.CompletedProcess]:
    env = dict(os.environ, PYTHONWARNINGS="default")
    procs = {
        name: subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for name, args in COMMANDS.items()
    }
    done = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def test_the_expected_subpackages_exist():
    assert {"reference", "testing", "train", "experiments"} <= set(SUBPACKAGES)


def test_import_loads_the_core_only(commands):
    proc = commands["import"]
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout)
    assert "lookahead_dist" in loaded
    pulled = [m for m in loaded if in_subpackage(m)]
    assert pulled == [], f"`import lookahead_dist` loaded modules of subpackages: {pulled}"
    shims = [m for m in loaded if f"{m.rpartition('.')[2]}.py" in CLI_SHIMS and m.startswith("lookahead_dist.")]
    assert shims == [], f"`import lookahead_dist` loaded command-line modules: {shims}"


def test_public_api_is_importable():
    from lookahead_dist import (  # noqa: F401
        CommError,
        ConfigError,
        Decentralized,
        DivergenceError,
        Lookahead,
        LookaheadDistError,
        MixingError,
        Schedule,
        SlowMo,
        Topology,
        TopologyError,
        comm,
        consensus_rate,
        invariant_vector,
        load,
        lookahead_matrix,
        run_passive,
    )

    for err in (ConfigError, TopologyError, MixingError, CommError, DivergenceError):
        assert issubclass(err, LookaheadDistError)
    for err in (ConfigError, TopologyError, MixingError):
        assert issubclass(err, ValueError)
    assert callable(load) and isinstance(Topology, type) and callable(comm.init_process_group)


def test_topology_command_runs_without_runpy_warning(commands):
    proc = commands["topology"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RuntimeWarning" not in proc.stderr, proc.stderr
    assert "agents: 4 on 4 ranks" in proc.stdout


@pytest.mark.parametrize("name", ["verify --help", "experiments --help"])
def test_command_help_exits_zero(commands, name):
    proc = commands[name]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "usage:" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr, proc.stderr


def modules():
    return sorted(PKG.rglob("*.py"))


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_no_module_over_500_lines_without_a_written_reason(path):
    """A module over 500 lines says why at its top: a docstring line starting with "Length: "."""
    lines = path.read_text().count("\n")
    if lines <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    reasons = [line for line in doc.splitlines() if line.startswith("Length: ") and line[len("Length: ") :].strip()]
    assert reasons, (
        f"{path.relative_to(ROOT)} has {lines} lines (> {MAX_LINES}); split it, or give the reason "
        "in its module docstring on a line starting with 'Length: '"
    )


def imported_modules(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """Every module that ``path`` (or ``text`` as if it were that file) imports, anywhere in the file
    (function bodies included), as absolute names with their line numbers."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    source = path.read_text() if text is None else text
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # `from lookahead_dist import train` imports a subpackage too
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def in_subpackage(module: str) -> str | None:
    for sub in SUBPACKAGES:
        if module == f"lookahead_dist.{sub}" or module.startswith(f"lookahead_dist.{sub}."):
            return sub
    return None


@pytest.mark.parametrize("path", sorted(PKG.glob("*.py")), ids=lambda p: p.name)
def test_core_never_imports_a_subpackage(path):
    allowed = CLI_SHIMS.get(path.name, ())
    bad = [
        f"line {line}: {module}"
        for line, module in imported_modules(path)
        if in_subpackage(module) and not any(module == a or module.startswith(a + ".") for a in allowed)
    ]
    assert bad == [], f"lookahead_dist/{path.name} imports a subpackage: {bad}"


def test_the_import_scanner_sees_relative_nested_and_from_package_imports():
    """The check above must be able to fail: a core module with each form of import is caught."""
    text = (
        "from . import train\n"
        "def f():\n    from .reference.simulate import Reference\n"
        "import lookahead_dist.experiments.runs as runs\n"
        "from lookahead_dist import testing\n"
        "from lookahead_dist.mixing import Schedule\n"
    )
    found = imported_modules(PKG / "probe.py", text)
    assert {in_subpackage(m) for _, m in found} - {None} == {"train", "reference", "experiments", "testing"}
    assert in_subpackage("lookahead_dist.mixing") is None and in_subpackage("lookahead_dist.trainer") is None


def test_tests_mirror_the_package():
    """Every folder under tests/ is the mirror of a subpackage of lookahead_dist (tests/a/b <-> lookahead_dist/a/b)."""
    orphans = []
    for folder in sorted(p for p in TESTS.rglob("*") if p.is_dir()):
        rel = folder.relative_to(TESTS)
        if any(part.startswith((".", "_")) for part in rel.parts):  # __pycache__, hidden folders
            continue
        if not (PKG / rel / "__init__.py").is_file():
            orphans.append(str(rel))
    assert orphans == [], f"tests/ folders without a matching lookahead_dist subpackage: {orphans}"
