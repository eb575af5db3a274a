"""The user-facing check: python -m lookahead_dist.verify FILE --nproc N."""

import io
import os
import subprocess
import sys

import pytest

from lookahead_dist import verify
from lookahead_dist.testing.workers import TOPOLOGIES

pytestmark = pytest.mark.dist


def test_verify_passes_on_the_slow_agent_example_and_reports_each_step():
    out = io.StringIO()
    ok = verify.verify(os.path.join(TOPOLOGIES, "slow_agent_own_rank.yaml"), 5, steps=8, out=out)
    text = out.getvalue()
    assert ok, text
    assert "5 agents on 5 ranks" in text and "largest deviation" in text and ": ok" in text
    lines = [line for line in text.splitlines() if line[:4].strip().isdigit()]
    assert len(lines) == 13  # steps 0..12: at least three periods of 4
    assert "predicted" in text


def test_verify_fails_beyond_tolerance_and_on_a_bad_file(tmp_path, capsys):
    # a negative tolerance cannot be met: the command must exit 1, not 0
    assert verify.main([os.path.join(TOPOLOGIES, "ring.yaml"), "--nproc", "2", "--steps", "3", "--tol", "-1"]) == 1
    assert "FAILED" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("generator: ring\nrepeat: 2\n")
    assert verify.main([str(bad), "--nproc", "2"]) == 2
    assert "bad.yaml" in capsys.readouterr().err


def test_verify_command_line_runs():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lookahead_dist.verify",
            os.path.join(TOPOLOGIES, "directed_push_sum.yaml"),
            "--nproc",
            "4",
            "--steps",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "push-sum: yes" in proc.stdout
