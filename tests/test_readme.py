"""The README's two commands stay true: CI runs the README's test command verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)[:2]


def test_ci_runs_the_readme_test_command():
    main_job, tests = readme_commands()
    assert "torchrun --standalone --nproc_per_node=4 launch/train.py" in main_job
    assert tests.endswith("python -m pytest -q")
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert tests in ci_lines


def test_both_commands_install_the_cpu_torch_first():
    for cmd in readme_commands():
        assert cmd.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install")
        assert cmd.index("torch==2.13.0") < cmd.index("-e '.[")  # the CPU build before the package
