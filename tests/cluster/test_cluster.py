"""The emulated cluster: shaped links at their rate, overlapping exchanges, and nothing left behind however a run ends.

One cluster (2 nodes x 2 ranks, 1 Gbit/s) runs cluster_checks.py, which times
a transfer across the link, one inside a node and an exchange both ways; the
other tests run a torch-free rank script to crash, be signalled or be killed.
Skipped, with the reason, only where network namespaces are not permitted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lookahead_dist.cluster import runs
from lookahead_dist.cluster.__main__ import main
from lookahead_dist.cluster.launcher import Options, run
from lookahead_dist.cluster.netns import ClusterError, netem_problem, privilege_problem, run_namespaces, usable_rate

pytestmark = pytest.mark.dist

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RATE = 1e9  # bits/s: 2 shared cores move this without becoming the bottleneck


@pytest.fixture(scope="module")
def permitted():
    problem = privilege_problem()
    if problem:
        pytest.skip(f"network namespaces are not permitted here: {problem}")


def _host_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its parent to reap it is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def assert_nothing_left(run_id: str, pids=(), links_before: set[str] | None = None) -> None:
    assert run_namespaces(run_id) == [], f"namespaces of run {run_id} left behind"
    assert not os.path.exists(os.path.join(runs.LOCK_DIR, f"{run_id}.lock")), f"lock of run {run_id} left behind"
    assert [p for p in pids if _alive(p)] == [], "rank processes left behind"
    if links_before is not None:
        assert _host_links() - links_before == set(), "an interface appeared in the host's namespace"


def _run_id(text: str) -> str:
    m = re.search(r"\[cluster\] run ([0-9a-f]+):", text)
    assert m, f"no run id in the launcher's output:\n{text}"
    return m.group(1)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lookahead_dist.cluster", *args]


def _wait_files(folder: Path, count: int, timeout: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(folder.glob("rank*.json"))
        if len(found) >= count:
            return [json.loads(p.read_text()) for p in found]
        time.sleep(0.05)
    raise AssertionError(f"only {len(list(folder.glob('rank*.json')))} of {count} ranks reported in {timeout} s")


@pytest.fixture(scope="module")
def checks(permitted, tmp_path_factory):
    """One 2-node x 2-rank cluster at 1 Gbit/s running cluster_checks.py (16 MiB messages)."""
    out = tmp_path_factory.mktemp("cluster") / "checks.json"
    links, lines = _host_links(), []
    # in this process: the command line is exercised by the signal tests, and a second import of torch costs seconds
    code = run(
        Options(nodes=2, procs_per_node=2, rate_bits=RATE, command=[str(HERE / "cluster_checks.py"), str(out), "16"]),
        log=lines.append,
    )
    text = "\n".join(f"[cluster] {line}" for line in lines)
    assert code == 0, text
    per_rank = json.loads(out.read_text())
    return {"stderr": text, "run_id": _run_id(text), "ranks": per_rank, "links": links}


def test_bandwidth_probe_printed_and_within_10_percent(checks):
    m = re.search(r"bandwidth node 0 -> node 1: ([0-9.]+) Gbit/s .*\(([-+0-9.]+)%\)", checks["stderr"])
    assert m, checks["stderr"]
    assert abs(float(m.group(1)) * 1e9 / 8 / usable_rate(RATE) - 1) <= 0.10


def test_transfer_across_the_link_takes_bytes_over_the_usable_rate(checks):
    r2 = checks["ranks"][2]
    predicted = r2["bytes"] / usable_rate(RATE)
    assert abs(r2["one_way"] / predicted - 1) <= 0.20, (r2["one_way"], predicted)


def test_cost_model_predicts_the_transfer_to_20_percent(checks):
    # the same transfer as a mixing step: agent 2 (node 1) takes half of agent 0 (node 0), nothing else moves
    import numpy as np

    from lookahead_dist.costmodel import Links, schedule_cost
    from lookahead_dist.mixing import Schedule

    P = np.eye(4)
    P[:, 2] = [0.5, 0.0, 0.5, 0.0]
    r2 = checks["ranks"][2]
    cost = schedule_cost(Schedule.static(P), (0, 1, 2, 3), r2["bytes"], Links(bandwidth_bits=RATE), ranks_per_node=2)
    assert cost.bytes_per_rank == r2["bytes"]
    assert abs(r2["one_way"] / cost.comm_s - 1) <= 0.20, (r2["one_way"], cost.comm_s)


def test_ranks_of_one_node_talk_unshaped(checks):
    # through the node's own address: delivered over lo, so far faster than the 1 Gbit/s link
    assert checks["ranks"][1]["intra"] < 0.5 * checks["ranks"][2]["one_way"], checks["ranks"][1:3]


def test_exchange_both_ways_takes_about_the_one_way_time(checks):
    one_way = checks["ranks"][2]["one_way"]
    for rank in (0, 2):
        assert checks["ranks"][rank]["exchange"] < 1.4 * one_way, (rank, checks["ranks"][rank], one_way)


def test_ranks_get_torchruns_environment(checks):
    envs = [r["env"] for r in checks["ranks"]]
    assert [e["RANK"] for e in envs] == ["0", "1", "2", "3"]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "0", "1"]
    assert {e["WORLD_SIZE"] for e in envs} == {"4"} and {e["LOCAL_WORLD_SIZE"] for e in envs} == {"2"}
    assert [e["GLOO_SOCKET_IFNAME"] for e in envs] == ["node0", "node0", "node1", "node1"]
    assert len({e["MASTER_ADDR"] for e in envs}) == 1 and envs[0]["MASTER_ADDR"].endswith(".1")
    assert envs[0]["MASTER_ADDR"].startswith("10.")


def test_normal_end_leaves_nothing(checks):
    assert_nothing_left(checks["run_id"], [r["pid"] for r in checks["ranks"]], checks["links"])


def test_crashing_rank_fails_the_run_naming_it_and_leaves_nothing(permitted, tmp_path):
    links, lines = _host_links(), []
    code = run(
        Options(
            nodes=2,
            procs_per_node=2,
            rate_bits=RATE,
            grace_s=2.0,
            command=[str(HERE / "rank_script.py"), str(tmp_path), "crash"],
        ),
        log=lines.append,
    )
    text = "\n".join(lines)
    assert code == 3, text
    assert "rank 1 (node 0, local rank 1) exited with code 3" in text
    pids = [json.loads(p.read_text())["pid"] for p in tmp_path.glob("rank*.json")]
    assert_nothing_left(_run_id("[cluster] " + lines[0]), pids, links)


def test_ctrl_c_stops_the_ranks_and_leaves_nothing_and_a_live_run_is_never_cleaned(permitted, tmp_path):
    lines, seen = [], []

    def interrupt():  # once every rank runs, the launcher's handlers are installed
        _wait_files(tmp_path, 2)
        runs.clean_leftovers()  # what another run's start does: this run is live, its lock held
        seen.append(run_namespaces(_run_id("[cluster] " + lines[0])))
        os.kill(os.getpid(), signal.SIGINT)

    t = threading.Thread(target=interrupt, daemon=True)
    t.start()
    code = run(
        Options(
            nodes=2,
            procs_per_node=1,
            rate_bits=RATE,
            grace_s=2.0,
            command=[str(HERE / "rank_script.py"), str(tmp_path), "sleep"],
        ),
        log=lines.append,
    )
    t.join(5)
    assert code == 128 + signal.SIGINT, lines
    assert len(seen[0]) == 3, seen  # bridge + 2 nodes survived the other start's cleaning
    pids = [json.loads(p.read_text())["pid"] for p in tmp_path.glob("rank*.json")]
    assert_nothing_left(_run_id("[cluster] " + lines[0]), pids)


def test_two_runs_at_once_do_not_collide_and_sigterm_or_sigkill_leave_nothing(permitted, tmp_path):
    """Run a gets SIGTERM and removes everything itself; run b gets SIGKILL and the next start removes its leftovers."""
    links, procs, dirs = _host_links(), [], [tmp_path / "a", tmp_path / "b"]
    try:
        for d in dirs:
            d.mkdir()
            procs.append(
                subprocess.Popen(
                    _cli(
                        "--nodes",
                        "2",
                        "--bandwidth",
                        "1gbit",
                        "--grace",
                        "2",
                        "--",
                        str(HERE / "rank_script.py"),
                        str(d),
                        "sleep",
                    ),
                    cwd=ROOT,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        ranks = [_wait_files(d, 2) for d in dirs]
        subnets = [{r["MASTER_ADDR"].rsplit(".", 1)[0] for r in rs} for rs in ranks]
        assert len(subnets[0]) == len(subnets[1]) == 1 and subnets[0] != subnets[1], subnets
        procs[0].send_signal(signal.SIGTERM)
        procs[1].kill()
        errs = [p.communicate(timeout=60)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    run_ids = [_run_id(e) for e in errs]
    assert run_ids[0] != run_ids[1]
    assert procs[0].returncode == 128 + signal.SIGTERM and "SIGTERM received" in errs[0], errs[0]
    assert_nothing_left(run_ids[0], [r["pid"] for r in ranks[0]], links)
    # SIGKILL leaves the bridge, 2 nodes and the lock (its ranks die with it: parent-death signal)
    assert len(run_namespaces(run_ids[1])) == 3
    assert os.path.exists(os.path.join(runs.LOCK_DIR, f"{run_ids[1]}.lock"))
    assert run_ids[1] in runs.clean_leftovers()
    assert_nothing_left(run_ids[1], [r["pid"] for r in ranks[1]], links)


def test_without_the_capabilities_it_fails_at_once_saying_so(permitted):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop capabilities")
    proc = subprocess.run(
        [
            "setpriv",
            "--bounding-set",
            "-net_admin,-sys_admin",
            *_cli("--nodes", "2", "--bandwidth", "1gbit", "--", "x.py"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "needs CAP_NET_ADMIN" in proc.stderr, proc.stderr
    assert "[cluster] run" not in proc.stderr  # refused before creating anything


def test_latency_without_netem_is_refused_saying_why(permitted, capsys):
    if netem_problem() is None:
        pytest.skip("this kernel has netem: a latency is accepted here")
    with pytest.raises(ClusterError, match="netem"):
        run(Options(nodes=2, procs_per_node=1, rate_bits=RATE, latency_s=200e-6, command=["x.py"]))
    assert main(["--nodes", "2", "--bandwidth", "1gbit", "--latency", "200us", "--", "x.py"]) == 1
    err = capsys.readouterr().err
    assert "--latency 200us refused" in err and "netem" in err, err
