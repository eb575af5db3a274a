"""Every shipped topology with all its agents on one CPU rank (gloo, world size 1) equals the float64 reference.

The same check runs on a GPU in tests/test_gpu.py; see tests/local_placement.py.
"""

import pytest
import torch

from lookahead_dist.testing.local_placement import SHIPPED, TOL, one_rank_group, run_all_on_one_rank


@pytest.fixture(scope="module")
def gloo_group():
    with one_rank_group("gloo"):
        yield torch.device("cpu")


@pytest.mark.parametrize("name", SHIPPED)
def test_all_agents_on_one_cpu_rank_equal_reference(gloo_group, name):
    worst = run_all_on_one_rank(name, gloo_group)
    assert worst <= TOL, f"{name}: largest deviation from the reference {worst:.3g}"


@pytest.mark.parametrize("name", SHIPPED)
def test_all_agents_on_one_cpu_rank_overlapped_equal_reference_in_combine_then_adapt_order(gloo_group, name):
    worst = run_all_on_one_rank(name, gloo_group, overlap=True)
    assert worst <= TOL, f"{name}: largest deviation from the combine-then-adapt reference {worst:.3g}"
