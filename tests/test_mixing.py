"""Mixing matrices and schedules: validation, invariant vectors, consensus rates."""

import math

import numpy as np
import pytest
import torch

from lookahead_dist.errors import MixingError
from lookahead_dist.mixing import (
    Phase,
    Schedule,
    as_matrix,
    check_column_stochastic,
    check_row_stochastic,
    consensus_rate,
    invariant_vector,
    is_column_stochastic,
    is_row_stochastic,
    lookahead_matrix,
    lookahead_schedule,
)


def ring_reference(n):
    """(I + S + S^T) / 3 with S the cyclic shift, built without networkx (n >= 3)."""
    S = np.roll(np.eye(n), 1, axis=1)
    return (np.eye(n) + S + S.T) / 3


# -- validation -----------------------------------------------------------------------


def test_as_matrix_accepts_lists_arrays_and_tensors():
    P = [[0.5, 0.5], [0.5, 0.5]]
    for value in (P, np.array(P), torch.tensor(P, dtype=torch.float32)):
        M = as_matrix(value)
        assert M.dtype == np.float64 and M.tolist() == P


def test_ragged_matrix():
    with pytest.raises(MixingError, match=r"ragged matrix: row 0 has 2 entries but row 1 has 1"):
        check_column_stochastic([[1.0, 0.0], [1.0]])


def test_non_square_matrix():
    with pytest.raises(MixingError, match=r"square and non-empty, got shape \(2, 3\)"):
        check_column_stochastic([[0.5, 0.5, 0.0], [0.5, 0.5, 1.0]])


def test_empty_matrix():
    with pytest.raises(MixingError, match="square and non-empty"):
        as_matrix([])


def test_string_entries_are_rejected():
    with pytest.raises(MixingError, match="entries must be real numbers"):
        as_matrix([["0.5", "0.5"], ["0.5", "0.5"]])


def test_nan_entry():
    with pytest.raises(MixingError, match=r"entry \[0, 1\] is nan"):
        check_column_stochastic([[0.5, float("nan")], [0.5, 0.5]])


def test_inf_entry():
    with pytest.raises(MixingError, match=r"entry \[1, 1\] is inf"):
        check_column_stochastic([[0.5, 0.5], [0.5, float("inf")]])


def test_negative_entry_names_its_index():
    with pytest.raises(MixingError, match=r"entry \[1, 0\] is -0\.5: weights must be >= 0"):
        check_column_stochastic([[1.5, 0.5], [-0.5, 0.5]])


def test_column_sum_names_column_and_sum():
    with pytest.raises(MixingError, match=r"column 1 sums to 0\.9, not 1"):
        check_column_stochastic([[1.0, 0.4], [0.0, 0.5]])


def test_tolerance_argument_is_honoured():
    P = [[1.0, 0.5 + 1e-6], [0.0, 0.5]]
    with pytest.raises(MixingError, match="column 1"):
        check_column_stochastic(P)
    assert check_column_stochastic(P, tol=1e-5).shape == (2, 2)
    assert not is_column_stochastic(P) and is_column_stochastic(P, tol=1e-5)


def test_row_stochastic_check():
    R = [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.25, 0.25, 0.5]]
    assert check_row_stochastic(R).shape == (3, 3)
    assert is_row_stochastic(R) and not is_column_stochastic(R)
    with pytest.raises(MixingError, match=r"row 2 sums to 0\.75"):
        check_row_stochastic([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.25, 0.0, 0.5]])
    with pytest.raises(MixingError, match="column 0 sums to 0.75"):
        check_column_stochastic(R)


# -- Lookahead -------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_lookahead_matrix_and_invariant_vector(alpha):
    P = lookahead_matrix(alpha)
    np.testing.assert_array_equal(P, [[alpha, alpha], [1 - alpha, 1 - alpha]])
    # both agents take alpha x + (1 - alpha) z
    X = np.array([[3.0, -1.0]])
    np.testing.assert_allclose(X @ P, [[3 * alpha - (1 - alpha)] * 2], rtol=0, atol=1e-15)
    a = invariant_vector(P)
    np.testing.assert_allclose(a, [alpha, 1 - alpha], rtol=0, atol=1e-15)
    np.testing.assert_allclose(lookahead_schedule(alpha, 4).invariant_vector(), [alpha, 1 - alpha], atol=1e-15)


def test_lookahead_matrix_alpha_zero_is_a_valid_degenerate_matrix():
    # alpha = 0 as a matrix: both agents take z (only the edge slow -> fast); the Lookahead optimizer refuses it
    P = lookahead_matrix(0.0)
    assert P.tolist() == [[0.0, 0.0], [1.0, 1.0]] and consensus_rate(P) == 0.0


def test_lookahead_alpha_one_has_rate_zero():
    assert consensus_rate(lookahead_matrix(1.0)) == 0.0
    assert lookahead_schedule(1.0, 5).consensus_rate() == 0.0


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_lookahead_alpha_out_of_range(alpha):
    with pytest.raises(MixingError, match="alpha must lie in"):
        lookahead_matrix(alpha)


def test_lookahead_bad_tau():
    with pytest.raises(MixingError, match="tau must be an integer >= 1, got 0"):
        lookahead_schedule(0.5, 0)


# -- schedules ---------------------------------------------------------------------------


def test_lookahead_schedule_indexing_over_several_periods():
    tau = 3
    s = lookahead_schedule(0.5, tau)
    assert s.period == tau and len(s) == tau
    sync = lookahead_matrix(0.5)
    for k in range(4 * tau):
        expected = sync if (k + 1) % tau == 0 else np.eye(2)
        np.testing.assert_array_equal(s.matrix(k), expected)
        np.testing.assert_array_equal(s[k], expected)
        assert s.is_identity(k) == ((k + 1) % tau != 0)


def test_schedule_indexing_with_repeats():
    A, B, C = np.eye(3), np.full((3, 3), 1 / 3), np.roll(np.eye(3), 1, axis=1)
    s = Schedule([Phase(A, 2), Phase(B, 3), C])
    assert s.period == 6 and s.n == 3
    pattern = [0, 0, 1, 1, 1, 2]
    for k in range(18):
        assert s.phase_index(k) == pattern[k % 6]
        np.testing.assert_array_equal(s.matrix(k), [A, B, C][pattern[k % 6]])
    with pytest.raises(MixingError, match="step k must be >= 0"):
        s.matrix(-1)


def test_schedule_matrices_are_read_only_copies():
    P = np.full((2, 2), 0.5)
    s = Schedule.static(P)
    P[0, 0] = 7.0
    assert s.matrix(0)[0, 0] == 0.5
    with pytest.raises(ValueError):
        s.matrix(0)[0, 0] = 1.0


def test_schedule_errors():
    with pytest.raises(MixingError, match="at least one phase"):
        Schedule([])
    with pytest.raises(MixingError, match=r"same number of agents, got sizes \[2, 3\]"):
        Schedule([np.eye(2), np.eye(3)])
    with pytest.raises(MixingError, match="repeat must be an integer >= 1, got 0"):
        Schedule([Phase(np.eye(2), 0)])
    with pytest.raises(MixingError, match=r"phase 1: column 0 sums"):
        Schedule([np.eye(2), [[0.5, 0.5], [0.0, 0.5]]])
    with pytest.raises(MixingError, match=r"phase 1: row 1 sums to 0\.5"):
        Schedule([[[0.5, 0.5], [0.0, 1.0]], [[0.5, 0.5], [0.0, 0.5]]], push_sum=True)


def test_period_product():
    A = ring_reference(5)
    B = np.full((5, 5), 0.2)
    C = np.kron(np.eye(1), A.T @ A)
    s = Schedule([Phase(A, 2), Phase(C, 1), Phase(B, 1)])
    np.testing.assert_allclose(s.period_product(), A @ A @ C @ B, rtol=0, atol=1e-15)
    s2 = lookahead_schedule(0.3, 4)
    np.testing.assert_array_equal(s2.period_product(), lookahead_matrix(0.3))


def test_invariant_vector_common_to_all_phases():
    sync = lookahead_matrix(0.3)
    a = invariant_vector([np.eye(2), sync, sync])
    np.testing.assert_allclose(a, [0.3, 0.7], atol=1e-15)
    # doubly stochastic matrices share 1/n
    np.testing.assert_array_equal(invariant_vector([ring_reference(6), np.eye(6)]), np.full(6, 1 / 6))


def test_invariant_vector_error_when_none_is_common():
    P1, P2 = lookahead_matrix(0.3), lookahead_matrix(0.6)
    for P in (P1, P2):
        assert is_column_stochastic(P)
    with pytest.raises(MixingError, match="no common invariant vector"):
        invariant_vector([P1, P2])
    with pytest.raises(MixingError, match="no common invariant vector"):
        Schedule([P1, P2]).invariant_vector()


def test_invariant_vector_of_identity_is_not_unique():
    with pytest.raises(MixingError, match="identity"):
        invariant_vector(np.eye(3))
    # one agent: a = [1] is unique
    np.testing.assert_array_equal(invariant_vector(np.eye(1)), [1.0])
    assert consensus_rate(np.eye(1)) == 0.0


def test_invariant_vector_not_unique_for_disconnected_groups():
    P = np.zeros((4, 4))
    P[:2, :2] = lookahead_matrix(0.3)
    P[2:, 2:] = lookahead_matrix(0.6)
    with pytest.raises(MixingError, match="not unique"):
        invariant_vector(P)
    # no consensus: the rate is 1, not an error
    assert consensus_rate(P) == pytest.approx(1.0, abs=1e-12)


def test_push_sum_schedule_uses_the_transpose():
    R = np.array([[1 / 3, 1 / 3, 1 / 3, 0], [0, 0.5, 0.5, 0], [0, 0, 0.5, 0.5], [0.5, 0, 0, 0.5]])
    s = Schedule([R], push_sum=True)
    np.testing.assert_array_equal(s.invariant_vector(), np.full(4, 0.25))
    assert s.consensus_rate() == pytest.approx(consensus_rate(R.T), abs=1e-15)
    assert 0 < s.consensus_rate() < 1


def test_fingerprint_changes_when_a_weight_changes():
    P = ring_reference(5)
    base = Schedule([P]).fingerprint()
    assert Schedule([P.copy()]).fingerprint() == base
    Q = P.copy()
    Q[0, 0] += 1e-12
    Q[1, 0] -= 1e-12
    assert Schedule([Q]).fingerprint() != base
    assert Schedule([Phase(P, 2)]).fingerprint() != base
    assert Schedule([P], push_sum=True).fingerprint() != base
    assert lookahead_schedule(0.5, 5).fingerprint() != lookahead_schedule(0.5, 4).fingerprint()


@pytest.mark.parametrize("n", range(3, 13))
def test_ring_consensus_rate_closed_form(n):
    rho = max(abs(1 / 3 + 2 / 3 * math.cos(2 * math.pi * k / n)) for k in range(1, n))
    P = ring_reference(n)
    assert consensus_rate(P) == pytest.approx(rho, abs=1e-12)
    assert Schedule([P]).consensus_rate() == pytest.approx(rho, abs=1e-12)
    assert Schedule([Phase(P, 3)]).consensus_rate(per_step=True) == pytest.approx(rho, abs=1e-9)


def test_consensus_rate_of_identity_is_one():
    assert consensus_rate(np.eye(4)) == pytest.approx(1.0)
    assert consensus_rate(np.full((4, 4), 0.25)) == pytest.approx(0.0, abs=1e-15)
