"""SlowMo's compressed slow step (sync_dtype) on spawned gloo ranks.

float32 "compression" is the exact average, bitwise; bfloat16 and int8 send the
pseudo-gradient z - x_r compressed with error feedback (lookahead_dist.compress),
stay close to the exact run, send about 1/2 and 1/4 of its bytes, and resume bitwise.
"""

import pytest
import torch

from lookahead_dist.compress import expected_bytes
from lookahead_dist.errors import ConfigError
from lookahead_dist.testing import workers
from lookahead_dist.testing.local_placement import one_rank_group
from lookahead_dist.testing.spawn import spawn

pytestmark = pytest.mark.dist

W, STEPS = 4, 13
ADAMW = ("AdamW", {"lr": 0.01, "weight_decay": 0.01})
NESTEROV = ("SGD", {"lr": 0.7, "momentum": 0.9, "nesterov": True})
DILOCO = dict(tau=4, inner=ADAMW, outer=NESTEROV)
CONFIGS = {
    "exact": dict(DILOCO),
    "float32": dict(DILOCO, sync_dtype="float32"),
    "bfloat16": dict(DILOCO, sync_dtype="bfloat16"),
    "int8": dict(DILOCO, sync_dtype="int8"),
    "rule": dict(tau=3, alpha=0.8, beta=0.5),
    "rule_float32": dict(tau=3, alpha=0.8, beta=0.5, sync_dtype="float32"),
    "rule_int8": dict(tau=3, alpha=0.8, beta=0.5, sync_dtype="int8"),
    "sgp_int8": dict(DILOCO, base="directed_push_sum.yaml", sync_dtype="int8"),
    "sgp": dict(DILOCO, base="directed_push_sum.yaml"),
    "fragments_int8": dict(DILOCO, fragments=2, sync_dtype="int8"),
    "fragments": dict(DILOCO, fragments=2),
    "resume_int8": dict(DILOCO, sync_dtype="int8", resume_at=6),
}


@pytest.fixture(scope="module")
def runs():
    return spawn(workers.slowmo_configs, W, CONFIGS, STEPS, timeout=400)


def rel(a, b):
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("exact, same", [("exact", "float32"), ("rule", "rule_float32")])
def test_float32_is_the_exact_average_bitwise(runs, exact, same):
    for r in runs:
        assert all(torch.equal(a, b) for a, b in zip(r[exact]["hist"], r[same]["hist"]))
        assert r[exact]["bytes"] == r[same]["bytes"]


@pytest.mark.parametrize("compressed, exact", [("bfloat16", "exact"), ("int8", "exact"), ("rule_int8", "rule")])
def test_compressed_runs_stay_close_and_send_what_the_formula_says(runs, compressed, exact):
    d = workers.make_problem(W).d  # float64 parameters: bf16 sends 1/4 of their bytes, int8 about 1/8
    per_sync = expected_bytes([d], W, "float32", element_size=8, weight_sum_given=True)
    for r in runs:
        err = rel(r[compressed]["hist"][-1], r[exact]["hist"][-1])
        assert 0 < err < 2e-2, f"{compressed}: deviation {err:.3g} from the exact run"
        syncs, rest = divmod(r[exact]["bytes"], per_sync)  # local SGD: the slow steps are all the traffic
        assert rest == 0 and syncs >= 3
        dtype = CONFIGS[compressed]["sync_dtype"]
        assert r[compressed]["bytes"] == syncs * expected_bytes([d], W, dtype, weight_sum_given=True)
    assert r[compressed]["bytes"] < (0.26 if dtype == "bfloat16" else 0.14) * r[exact]["bytes"]


@pytest.mark.parametrize("compressed, exact", [("sgp_int8", "sgp"), ("fragments_int8", "fragments")])
def test_compressed_push_sum_and_fragments_stay_close(runs, compressed, exact):
    for r in runs:
        assert 0 < rel(r[compressed]["hist"][-1], r[exact]["hist"][-1]) < 2e-2
        assert r[compressed]["bytes"] < r[exact]["bytes"]
    finals = [r[compressed]["finalized"] for r in runs]
    assert all(torch.equal(f, finals[0]) for f in finals)  # finalize() gives every rank the same model


def test_compressed_resume_is_bitwise(runs):
    for r in runs:
        assert torch.equal(r["resume_int8"]["full"], r["resume_int8"]["resumed"])


def test_bad_sync_dtype_and_bad_combinations_are_refused():
    from lookahead_dist.slowmo import SlowMo

    with one_rank_group("gloo"):
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(ConfigError, match=r"sync_dtype.*'fp8'"):
            SlowMo(opt, model, tau=2, sync_dtype="fp8")
        with pytest.raises(ConfigError, match=r"sync_dtype='int8'.*shard=True"):
            SlowMo(opt, model, tau=2, sync_dtype="int8", shard=True)
        with pytest.raises(ConfigError, match=r"sync_dtype='bfloat16'.*overlap_slow=True"):
            SlowMo(opt, model, tau=2, sync_dtype="bfloat16", overlap_slow=True)
