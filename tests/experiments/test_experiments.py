"""The experiment commands in tiny configurations, through the same code as the full runs."""

import json
import math

import numpy as np
import pytest

import lookahead_dist.experiments as ex
from lookahead_dist.errors import ConfigError
from lookahead_dist.experiments import report as rep

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

TINY = {
    "fig1": ["--steps", "10", "--seeds", "2", "--alphas", "0.5", "--eval-every", "5"],
    "theorem2": [
        "--K",
        "100",
        "--seeds",
        "2",
        "--taus",
        "1,5",
        "--gammas",
        "0.02",
        "--alpha-step",
        "0.25",
        "--table-alphas",
        "0.5,1",
    ],
    "slowmo": ["--steps", "8", "--seeds", "1", "--betas", "0,0.5", "--tau", "4", "--eval-every", "4"],
}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    path = tmp_path_factory.mktemp("results")
    for name, argv in TINY.items():
        assert ex.main([name, "--out", str(path)] + argv) == 0
    return path


def _record(out, name):
    return json.loads((out / f"{name}.json").read_text())


@pytest.mark.dist
@pytest.mark.parametrize("name", list(TINY))
def test_outputs_exist_and_name_their_command(out, name):
    for ext in ("png", "csv", "md", "json"):
        assert (out / f"{name}.{ext}").stat().st_size > 0
    rec = _record(out, name)
    assert rec["command"] == " ".join([ex.PROG, name, "--out", str(out)] + TINY[name])
    assert rec["wall_time_s"] > 0 and rec["machine"]["cpus"] >= 1
    md = (out / f"{name}.md").read_text()
    assert rec["command"] in md and "Findings:" in md


@pytest.mark.dist
def test_fig1_serial_and_two_process_curves_coincide(out):
    rec = _record(out, "fig1")
    assert [v["alpha"] for v in rec["variants"]] == [1.0, 0.5]
    assert rec["steps_axis"] == [0, 5, 10]
    assert rec["max_rel_deviation"] <= 1e-6
    for v in rec["variants"]:
        s, d = np.array(v["serial_curves"]), np.array(v["two_process_curves"])
        assert s.shape == d.shape == (2, 3)
        np.testing.assert_allclose(d, s, rtol=1e-6, atol=0)
        assert np.all(np.isfinite(s)) and len(v["serial_test_accuracy"]) == 2
    sgd = rec["variants"][0]
    assert sgd["serial_curves"] == sgd["two_process_curves"]  # alpha = 1 is the inner optimizer alone
    # the same seed gives the same initial model to every variant, different seeds different ones
    la = rec["variants"][1]
    assert [c[0] for c in la["serial_curves"]] == [c[0] for c in sgd["serial_curves"]]
    assert sgd["serial_curves"][0][0] != sgd["serial_curves"][1][0]
    text = " ".join(rep.findings("fig1", rec))
    assert "(a)" in text and "max relative deviation" in text


@pytest.mark.dist
def test_theorem2_rows_and_recommendation(out):
    rec = _record(out, "theorem2")
    assert rec["alphas"] == [0.25, 0.5, 0.75, 1.0]
    assert len(rec["rows"]) == 4 * 2
    for r in rec["rows"]:
        assert r["holds13"] == (r["cond13"] <= 1.0)
        assert math.isclose(r["ratio"], r["empirical"] / r["bound14"])
        if r["holds13"]:
            assert r["ratio"] <= 1.0
    for r in rec["recommended"]:
        assert 0.0 < r["recommended_alpha"] <= 1.0
        assert r["best_alpha"] in rec["alphas"]
    alpha_one = [r["empirical"] for r in rec["rows"] if r["alpha"] == 1.0]
    assert alpha_one[0] == alpha_one[1]  # alpha = 1: tau does not matter, the same noise


@pytest.mark.dist
def test_slowmo_runs(out):
    rec = _record(out, "slowmo")
    assert rec["slow_steps"] == 2 and rec["steps_axis"] == [0, 4, 8]
    runs = rec["runs"]
    assert sorted((r["base"], r["beta"]) for r in runs) == sorted(
        (b, beta) for b in ("local SGD", "SGP") for beta in (0.0, 0.5)
    )
    for r in runs:
        assert len(r["curve"]) == 3 and r["curve"][-1] == r["final_train_loss"]
        assert 0.0 <= r["test_accuracy"] <= 1.0 and math.isfinite(r["final_train_loss"])
    # every configuration starts from the same model
    assert len({r["curve"][0] for r in runs}) == 1


@pytest.mark.dist
def test_report_writes_results_md(out, tmp_path):
    assert ex.main(["report", "--out", str(out), "--docs", str(tmp_path)]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    for name in ("fig1", "theorem2", "slowmo"):
        assert f"(img/{name}.png)" in text
        assert (tmp_path / "img" / f"{name}.png").stat().st_size > 0
        assert _record(out, name)["command"] in text
    assert "Wall time on this machine" in text


def test_report_marks_missing_outputs(tmp_path):
    path = rep.write_results_md(tmp_path / "nothing", tmp_path / "docs")
    assert path.read_text().count("Not run yet") == 3


def test_recorded_command_parses_back_to_its_config():
    cfg = ex.SlowMoConfig(steps=24, betas=(0.0, 0.9), tau=6, eval_every=12)
    argv = ex.command("slowmo", cfg, "somewhere").split()[3:]
    args = ex.build_parser().parse_args(argv)
    assert args.out == "somewhere" and ex.config_from_args(args) == cfg


@pytest.mark.parametrize(
    "name, cfg",
    [
        ("fig1", ex.Fig1Config(eval_every=7)),  # not a multiple of tau = 5
        ("fig1", ex.Fig1Config(alphas=(0.5, 1.0))),  # alpha = 1 is the SGD baseline already
        ("slowmo", ex.SlowMoConfig(steps=50)),  # not a multiple of tau = 12
        ("theorem2", ex.Theorem2Config(K=101)),
        ("theorem2", ex.Theorem2Config(alpha_step=0.3)),
    ],
)
def test_bad_configs_are_refused_before_running(name, cfg, tmp_path):
    run = {"fig1": ex.run_fig1, "slowmo": ex.run_slowmo, "theorem2": ex.run_theorem2}[name]
    with pytest.raises(ConfigError):
        run(cfg, str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_progress_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)
    bar = ex.Progress(20, "demo")
    for k in range(0, 21, 2):
        bar.set(k)
    bar.close()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[demo]")]
    assert lines[0] == "[demo] 0/20 steps" and lines[-1].startswith("[demo] 20/20 steps")
    assert 2 <= len(lines) <= 12


def test_the_experiments_use_the_trainers_batches_and_schedule():
    """The experiments' batch stream and schedule are the trainer's: the same batches and rates for the same run."""
    import torch

    from lookahead_dist.experiments import common
    from lookahead_dist.train.config import load_config
    from lookahead_dist.train.data import build_data
    from lookahead_dist.train.schedules import lr_at

    cfg = load_config(
        None, ["seed=0", "batch_size=40", "optim.schedule=step", "optim.milestones=[5, 8]", "optim.lr=0.05", "steps=10"]
    )
    xtr, ytr, _, _ = common.digits(torch.float32)
    for rank in (0, 2):
        mine = common.batch_stream(xtr, ytr, 0, 40, rank, 4)
        theirs = build_data(cfg, rank, 4).batches(0)
        for _ in range(12):  # past the end of an epoch (8 steps of 40 in a shard of 359)
            (x1, y1), (x2, y2) = next(mine), next(theirs)
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    fig1 = ex.Fig1Config(steps=10, lr=0.05, milestones=(0.5, 0.8), decay=0.1)
    assert [common.scheduled_lr(fig1, k) for k in range(10)] == [lr_at(cfg, k, 10, 8) for k in range(10)]
