"""The compressed exact average: the int8 and bfloat16 codecs in one process, the sync on 4 spawned gloo ranks.

Bounds used below (module docstring of lookahead_dist.compress): one round of int8 is within
W s_1 / (2 S) + s_2 / 2 of the float64 average (s_1: the step of the ranks' numerators, s_2: the step of
the average, S: the weight sum); bfloat16 within 2^-8 of each magnitude on each of the two encodings; with
error feedback the running sum of the applied averages stays within one step of the exact running sum.
"""

from __future__ import annotations

import math

import pytest
import torch

from lookahead_dist.compress import (
    BLOCK_SIZE,
    CompressedSync,
    Residuals,
    block_absmax,
    block_layout,
    check_sync_dtype,
    compressed_average_,
    dequantize_int8,
    expected_bytes,
    quantize_int8,
    scales_from_absmax,
)
from lookahead_dist.errors import ConfigError
from lookahead_dist.testing import workers
from lookahead_dist.testing.spawn import spawn

W = 4
BF16_U = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits, round to nearest)


# -- one process: layout, codecs, byte formulas, argument checks ------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 64])
@pytest.mark.parametrize("n", [1, 2, 5, 4095, 4096, 4097, 16384, 16385, 100_003, 3 * 4096 * 4 + 5])
def test_block_layout_pads_little_and_keeps_blocks_at_most_the_block_size(n, world):
    c, m, b = block_layout(n, world)
    assert c == m * b and b <= BLOCK_SIZE and world * c >= n
    assert m == math.ceil(math.ceil(n / world) / BLOCK_SIZE)  # no more blocks than the chunk needs
    assert world * c - n < world * (m + 1)
    assert block_layout(n, world, 100)[2] <= 100


def test_int8_round_trip_is_within_half_a_step_and_uses_the_full_range():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(6 * 512, generator=g, dtype=torch.float64) * torch.logspace(
        -3, 2, 6, dtype=torch.float64
    ).repeat_interleave(512)
    v[512:1024] = 0.0  # an all-zero block
    scale = scales_from_absmax(block_absmax(v, 512))
    assert scale.dtype == torch.float32 and scale[1] == 1.0
    q = quantize_int8(v, scale)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert torch.equal(q[512:1024], torch.zeros(512, dtype=torch.int8))
    back = dequantize_int8(q, scale, torch.float64)
    step = scale.double().repeat_interleave(512)
    assert bool(((v - back).abs() <= step / 2 * (1 + 1e-12)).all())
    assert torch.equal(back[512:1024], torch.zeros(512, dtype=torch.float64))
    # each block's largest value is a code of +-127 exactly
    for j in range(6):
        if j != 1:
            assert int(q[j * 512 : (j + 1) * 512].abs().max()) == 127


def test_int8_codes_clamp_and_integer_sums_do_not_wrap():
    scale = torch.tensor([1.0])
    assert quantize_int8(torch.tensor([300.0, -300.0, 126.6, -0.5, 0.5]), scale).tolist() == [127, -127, 127, 0, 0]
    codes = torch.full((W, 3), 127, dtype=torch.int8)
    assert int((codes[0] + codes[1])[0]) != 254  # int8 arithmetic wraps: why the sum is taken in int32
    assert codes.to(torch.int32).sum(dim=0, dtype=torch.int32).tolist() == [127 * W] * 3
    # a dequantized int32 sum is the sum of the dequantized codes
    assert torch.equal(
        dequantize_int8(codes.to(torch.int32).sum(0, dtype=torch.int32), scale, torch.float64),
        torch.full((3,), 508.0, dtype=torch.float64),
    )


def test_a_nan_becomes_an_infinite_absmax():
    amax = block_absmax(torch.tensor([1.0, float("nan"), 2.0, -3.0]), 2)
    assert amax.tolist() == [math.inf, 3.0]


def test_byte_formulas():
    n = W * 4096 * 8  # full blocks: c = 32768, m = 8
    f32 = expected_bytes([n], W, "float32", weight_sum_given=True)
    assert f32 == 2 * (W - 1) * n * 4 // W
    assert expected_bytes([n], W, "bfloat16", weight_sum_given=True) * 2 == f32
    int8 = expected_bytes([n], W, "int8", weight_sum_given=True)
    assert int8 == (W - 1) * (2 * 32768 + 12 * 8)
    assert int8 / f32 == pytest.approx(0.25 + 1.5 / 4096, rel=1e-12)
    # the weight sum's all-reduce: 2 (W - 1) / W x 8 bytes, rounded up
    assert expected_bytes([n], W, "int8") - int8 == 12 and expected_bytes([n], 3, "int8", block_size=7) > 0
    assert expected_bytes([0, 5], 1, "int8") == 0  # one rank sends nothing


@pytest.mark.parametrize("bad", ["fp8", "float16", "bf16", torch.bfloat16, 8, ["int8"]])
def test_bad_sync_dtype_is_a_config_error_naming_it(bad):
    with pytest.raises(ConfigError, match=r"sync_dtype must be one of .*got"):
        check_sync_dtype(bad)
    with pytest.raises(ConfigError, match="sync_dtype"):
        CompressedSync(bad)
    with pytest.raises(ConfigError, match="sync_dtype") as info:
        compressed_average_([torch.zeros(3)], 1.0, None, sync_dtype=bad)  # refused before any communication
    assert info.value.argument == "sync_dtype" and info.value.value is bad


def test_other_bad_arguments():
    assert check_sync_dtype(None) == "float32" and CompressedSync(None).residual is None
    with pytest.raises(ConfigError, match=r"block_size must be an integer in \[1, 4096\], got 5000"):
        CompressedSync("int8", block_size=5000)
    with pytest.raises(ConfigError, match="block_size must be an integer >= 1, got 0"):
        compressed_average_([torch.zeros(3)], 1.0, None, sync_dtype="int8", block_size=0)
    with pytest.raises(ConfigError, match=r"buffers\[1\] must be a floating-point tensor, got dtype torch.int64"):
        compressed_average_([torch.zeros(3), torch.zeros(3, dtype=torch.long)], 1.0, None, sync_dtype="int8")


def test_ranks_without_this_rank_are_refused_before_any_communication():
    class NoComm:  # any collective would fail: it has none
        rank, world_size = 0, 4

    with pytest.raises(ConfigError, match=r"ranks must include this rank \(0\) .*got \[1, 2\]"):
        compressed_average_([torch.zeros(3)], 1.0, NoComm(), sync_dtype="int8", weight_sum=2.0, ranks=[2, 1])


def test_residuals_refuse_a_changed_layout_and_round_trip_through_a_state():
    res = Residuals()
    kept = res.for_buffer("owned", 0, 10, torch.float32, "cpu")
    kept += 1.5
    with pytest.raises(
        ConfigError, match="owned residual of buffer 0 holds 10 torch.float32 elements but the sync needs 12"
    ):
        res.for_buffer("owned", 0, 12, torch.float32, "cpu")
    sync = CompressedSync("int8")
    sync.residual = res
    sync.total_bytes_sent = 77
    again = CompressedSync("int8")
    again.load_state_dict(sync.state_dict())
    assert torch.equal(again.residual.owned[0], torch.full((10,), 1.5)) and again.total_bytes_sent == 77
    with pytest.raises(ConfigError, match="sync_dtype: the state was saved with 'int8', this sync uses 'bfloat16'"):
        CompressedSync("bfloat16").load_state_dict(sync.state_dict())
    with pytest.raises(ConfigError, match="error_feedback"):
        CompressedSync("int8", error_feedback=False).load_state_dict(sync.state_dict())


# -- 4 spawned gloo ranks, one group for every check -------------------------------------------------------


@pytest.fixture(scope="module")
def suite():
    return spawn(workers.compressed_syncs, W, timeout=600)


def _weighted_mean(results, i):
    rounds = [r["one_round"] for r in results]
    w = rounds[0]["weights"]
    return sum(w[r] * rounds[r]["inputs"][i] for r in range(W)) / sum(w), rounds


@pytest.mark.dist
def test_float32_and_none_are_exact_average_bitwise(suite):
    for r in suite:
        exact, numels = r["f32"]["exact"], [b.numel() for b in r["f32"]["exact"]]
        for dt in (None, "float32"):
            bufs, nbytes, wsum = r["f32"][dt]
            assert all(torch.equal(a, b) for a, b in zip(bufs, exact))
            assert wsum == 3.5
            f32 = expected_bytes(numels[:3], W, "float32")
            assert nbytes == f32 + expected_bytes(numels[3:], W, "float32", element_size=8, weight_sum_given=True)
    assert all(torch.equal(a, b) for r in suite for a, b in zip(r["f32"]["exact"], suite[0]["f32"]["exact"]))


@pytest.mark.dist
def test_int8_one_round_of_values_over_100_never_overflows(suite):
    sizes = suite[0]["one_round"]["sizes"]
    for i, n in enumerate(sizes):
        expected, rounds = _weighted_mean(suite, i)
        w = rounds[0]["weights"]
        s = sum(w)
        step1 = max(float((w[r] * rounds[r]["inputs"][i]).abs().max()) for r in range(W)) / 127
        term1 = W * step1 / (2 * s)
        step2 = (float(expected.abs().max()) + term1) / 127
        bound = term1 + step2 / 2 + 1e-6 * 127 * step1  # the last term: float32 inputs and arithmetic
        got = suite[0]["one_round"]["int8"][0][i].double()
        err = (got - expected).abs()
        assert float(err.max()) <= bound, (n, float(err.max()), bound)
        assert float(expected[: min(n, 50)].min()) > 100  # where an int8 sum of codes would have wrapped
        for r in suite:
            assert torch.equal(r["one_round"]["int8"][0][i], suite[0]["one_round"]["int8"][0][i])
    for r in suite:
        _, nbytes, wsum, nbytes_given = r["one_round"]["int8"]
        assert wsum == 3.5
        assert nbytes == expected_bytes(sizes, W, "int8")
        assert nbytes_given == expected_bytes(sizes, W, "int8", weight_sum_given=True) == nbytes - 12


@pytest.mark.dist
def test_bfloat16_one_round_rounds_only_the_two_encodings(suite):
    sizes = suite[0]["one_round"]["sizes"]
    for i in range(len(sizes)):
        expected, rounds = _weighted_mean(suite, i)
        w = rounds[0]["weights"]
        mass = sum((w[r] * rounds[r]["inputs"][i]).abs() for r in range(W)) / sum(w)
        term1 = mass * BF16_U
        bound = term1 + (expected.abs() + term1) * BF16_U + 1e-6 * mass
        got = suite[0]["one_round"]["bfloat16"][0][i].double()
        assert bool(((got - expected).abs() <= bound).all())
        assert not torch.equal(got, expected)  # something was rounded: the check above can fail
        for r in suite:
            assert torch.equal(r["one_round"]["bfloat16"][0][i], suite[0]["one_round"]["bfloat16"][0][i])
    for r in suite:
        assert r["one_round"]["bfloat16"][1] == expected_bytes(sizes, W, "bfloat16")


@pytest.mark.dist
@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
@pytest.mark.parametrize("inputs", ["fixed", "random"])
def test_error_feedback_keeps_the_running_sum_within_one_step(suite, dtype, inputs):
    """40 rounds; top: the largest |x| of any rank and round, per element. One step per element: int8
    s_1 / 2 + s_2 / 2 <= (block's top / 127)(1 + 1/127 + ...); bfloat16 two half-ulps, 2 u top."""
    ef = suite[0]["ef"][(dtype, inputs, True)]
    top = torch.stack([r["ef"][(dtype, inputs, True)]["top"] for r in suite]).amax(dim=0)
    if dtype == "int8":
        _, _, b = block_layout(top.numel(), W)
        padded = torch.cat([top, top.new_zeros(-top.numel() % b)])
        step = (padded.view(-1, b).amax(dim=1, keepdim=True) / 127 * 1.02).expand(-1, b).reshape(-1)[: top.numel()]
    else:
        step = top * 2 * BF16_U * 1.02
    drift = (ef["applied"] - ef["true"]).abs()
    assert bool((drift <= step).all()), float((drift / step).max())
    assert max(ef["errs"]) <= float(step.max())  # every round, not only the last
    for r in suite:
        assert torch.equal(r["ef"][(dtype, inputs, True)]["applied"], ef["applied"])
    if inputs == "fixed":  # without feedback the sums drift apart: the check above can fail
        plain = suite[0]["ef"][(dtype, inputs, False)]
        assert float(((plain["applied"] - plain["true"]).abs() / step).max()) > 5
        assert plain["errs"][-1] > 10 * plain["errs"][0]


@pytest.mark.dist
def test_a_resume_with_the_residuals_is_bitwise(suite):
    for r in suite:
        res = r["resume"]
        assert all(torch.equal(a, b) for a, b in zip(res["rest"], res["resumed"]))
        assert not all(torch.equal(a, b) for a, b in zip(res["rest"], res["fresh"]))  # the residuals matter
        total, resumed_total, last = res["totals"]
        assert total == resumed_total == 6 * last == 6 * expected_bytes([3001], W, "int8")


@pytest.mark.dist
def test_a_subgroup_of_ranks(suite):
    members = suite[1:]
    expected = sum(r["subset"]["x"] for r in members) / 3
    step1 = max(float(r["subset"]["x"].abs().max()) for r in members) / 127
    bound = (step1 / 2 + (float(expected.abs().max()) + step1 / 2) / 127 / 2) * (1 + 1e-9)
    for r in members:
        assert float((r["subset"]["avg"] - expected).abs().max()) <= bound
        assert torch.equal(r["subset"]["avg"], members[0]["subset"]["avg"])
        assert r["subset"]["bytes"] == expected_bytes([9000], 3, "int8")
    assert "subset" not in suite[0]


@pytest.mark.dist
def test_a_non_finite_value_raises_on_every_rank_and_the_group_goes_on(suite):
    for r in suite:
        assert r["nan"].startswith("DivergenceError: int8 sync of buffer 0: a value is not finite")
        assert float((r["after_nan"] - 1.5).abs().max()) <= (3 / 127 + 1.5 / 127) / 2 * 1.001
