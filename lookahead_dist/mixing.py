"""Mixing matrices and schedules: the algebra of X_{k+1} = (X_k - G_k) P_k.

Convention (paper eq. 4): agents are the **columns** of X_k = [x_1, ..., x_n].
P_k is n x n, non-negative and **column-stochastic**: column j holds the
weights agent j takes from every agent, so agent j's new value is
sum_i P_k[i, j] x_i and every column sums to 1.

Push-sum (sum-preserving) schedules are **row-stochastic** instead: row i
holds how agent i splits its mass among the receivers, so X_k 1 is preserved.

Everything here is float64 NumPy; nothing touches torch.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from lookahead_dist.errors import MixingError
from lookahead_dist.validation import check_mixing_alpha, check_tau

DEFAULT_TOL = 1e-9

__all__ = [
    "DEFAULT_TOL",
    "Phase",
    "Schedule",
    "as_matrix",
    "check_column_stochastic",
    "check_row_stochastic",
    "components",
    "consensus_rate",
    "invariant_vector",
    "is_column_stochastic",
    "is_row_stochastic",
    "lookahead_matrix",
    "lookahead_schedule",
    "weight_problem",
]


def as_matrix(P, name: str = "P") -> np.ndarray:
    """Return ``P`` (nested lists, NumPy array or torch tensor) as a float64 n x n array.

    Raises :class:`MixingError` for a ragged, non-square, empty or non-numeric input.
    """
    if hasattr(P, "detach"):  # a torch tensor, without importing torch here
        P = P.detach().cpu().double().numpy()
    if isinstance(P, (list, tuple)):
        lengths = [len(row) if isinstance(row, (list, tuple, np.ndarray)) else None for row in P]
        if any(length is None for length in lengths):
            raise MixingError(f"{name}: every row must be a list of numbers, got {P!r}")
        if len(set(lengths)) > 1:
            bad = next(i for i, length in enumerate(lengths) if length != lengths[0])
            raise MixingError(f"{name}: ragged matrix: row 0 has {lengths[0]} entries but row {bad} has {lengths[bad]}")
    try:
        kind = np.asarray(P).dtype.kind
    except (TypeError, ValueError):
        kind = "O"
    if kind not in "biuf":  # strings, None or complex would be converted silently
        raise MixingError(f"{name}: entries must be real numbers, got {P!r}")
    try:
        M = np.array(P, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MixingError(f"{name}: entries must be numbers ({exc})") from None
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
        raise MixingError(f"{name}: a mixing matrix must be square and non-empty, got shape {M.shape}")
    return M


def weight_problem(x: float):
    """Why ``x`` cannot be a mixing weight (an entry of P, an edge weight), or None when it can."""
    try:
        finite = math.isfinite(x)
    except OverflowError:  # an integer beyond float64, e.g. 10**400 from YAML
        return "the weight is beyond the float64 range"
    if not finite:
        return "NaN/inf weights are not allowed"
    if x < 0:
        return "weights must be >= 0"
    return None


def _check_entries(M: np.ndarray, name: str) -> None:
    bad = np.argwhere(~np.isfinite(M) | (M < 0))
    if bad.size:
        i, j = (int(v) for v in bad[0])
        raise MixingError(f"{name}: entry [{i}, {j}] is {float(M[i, j])!r}: {weight_problem(float(M[i, j]))}")


_SUM_RULES = {
    0: (
        "column",
        "column {i} holds the weights agent {i} takes from every agent, so it must sum to 1 "
        "(declare push_sum for a row-stochastic matrix)",
    ),
    1: ("row", "in a push-sum matrix row {i} is how agent {i} splits its mass, so it must sum to 1"),
}


def _check_sums(P, axis: int, tol: float, name: str) -> np.ndarray:
    """as_matrix + finite, non-negative entries + every column (axis 0) or row (axis 1) summing to 1."""
    M = as_matrix(P, name)
    _check_entries(M, name)
    sums = M.sum(axis=axis)
    bad = np.flatnonzero(np.abs(sums - 1.0) > tol)
    if bad.size:
        i = int(bad[0])
        what, why = _SUM_RULES[axis]
        raise MixingError(f"{name}: {what} {i} sums to {float(sums[i])!r}, not 1 (tol {tol:g}); {why.format(i=i)}")
    return M


def check_column_stochastic(P, tol: float = DEFAULT_TOL, name: str = "P") -> np.ndarray:
    """Validate a mixing matrix: square, finite, non-negative, every column sums to 1.

    Returns the matrix as float64. Raises :class:`MixingError` naming what is
    wrong and where (the entry index, or the column and its sum).

    >>> check_column_stochastic([[0.5, 0.5], [0.5, 0.5]]).shape
    (2, 2)
    """
    return _check_sums(P, 0, tol, name)


def check_row_stochastic(P, tol: float = DEFAULT_TOL, name: str = "P") -> np.ndarray:
    """Validate a push-sum (sum-preserving) matrix: square, finite, non-negative, every row sums to 1.

    Row i holds how agent i splits its mass among the receivers.
    """
    return _check_sums(P, 1, tol, name)


def is_column_stochastic(P, tol: float = DEFAULT_TOL) -> bool:
    try:
        check_column_stochastic(P, tol)
    except MixingError:
        return False
    return True


def is_row_stochastic(P, tol: float = DEFAULT_TOL) -> bool:
    try:
        check_row_stochastic(P, tol)
    except MixingError:
        return False
    return True


def lookahead_matrix(alpha: float) -> np.ndarray:
    """The synchronisation matrix of Lookahead, a 1^T with a = [alpha, 1 - alpha]^T (paper eq. 5).

    Agent 0 is the fast model x, agent 1 the slow model z; after the step both hold
    alpha x + (1 - alpha) z. alpha = 1 is valid: its only edge is fast -> slow.

    >>> lookahead_matrix(0.5)
    array([[0.5, 0.5],
           [0.5, 0.5]])
    """
    alpha = check_mixing_alpha(alpha, error=MixingError)
    a = np.array([alpha, 1.0 - alpha])
    return np.outer(a, np.ones(2))


def _eig_one(M: np.ndarray) -> tuple[np.ndarray, int]:
    """Eigenvector of M for the eigenvalue nearest 1, normalised to sum 1, and the multiplicity of 1."""
    w, V = np.linalg.eig(M)
    near = np.abs(w - 1.0)
    mult = int(np.sum(near < 1e-8))
    if mult > 1:
        # any vector of the eigenspace will do; take one that does not sum to 0
        cands = np.flatnonzero(near < 1e-8)
        best = cands[int(np.argmax([abs(np.real(V[:, c]).sum()) for c in cands]))]
    else:
        best = int(np.argmin(near))
    v = np.real(V[:, best])
    s = v.sum()
    if abs(s) < 1e-12:
        raise MixingError("the eigenvector for eigenvalue 1 sums to 0; no invariant probability vector")
    a = v / s
    a[np.abs(a) < 1e-15] = 0.0
    return a, mult


def components(P) -> list[list[int]]:
    """Connected components of the graph i ~ j iff P[i, j] != 0 (i != j), each sorted, in order of their smallest agent.

    The direction of an edge is ignored (union-find over the non-zero off-diagonal entries).
    """
    P = np.asarray(P)
    n = P.shape[0]
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rows, cols = np.nonzero(P)
    for i, j in zip(rows.tolist(), cols.tolist()):
        if i != j:
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return [groups[r] for r in sorted(groups)]


def _is_doubly_stochastic(M: np.ndarray, tol: float) -> bool:
    return bool(np.all(np.abs(M.sum(axis=0) - 1) <= tol) and np.all(np.abs(M.sum(axis=1) - 1) <= tol))


def invariant_vector(matrices, tol: float = 1e-9) -> np.ndarray:
    """The vector a with P a = a for every given P, 1^T a = 1 (paper eqs. 6-8).

    ``matrices`` is a matrix, a list of matrices or a :class:`Schedule`. With it,
    y_k = X_k a obeys y_{k+1} = y_k - G_k a exactly. Doubly stochastic matrices
    give a = 1/n exactly. Raises :class:`MixingError` when the matrices share no
    such vector, or when it is not unique (e.g. the identity: no communication).
    """
    if isinstance(matrices, Schedule):
        mats = [p.matrix for p in matrices.phases]
    elif isinstance(matrices, np.ndarray) and matrices.ndim == 2:
        mats = [matrices]
    else:
        mats = [np.asarray(m, dtype=np.float64) for m in matrices]
    n = mats[0].shape[0]
    if n == 1:
        return np.ones(1)
    if all(_is_doubly_stochastic(m, tol) for m in mats):
        a = np.full(n, 1.0 / n)
        # For doubly stochastic matrices the invariant vector is unique iff the union graph is connected.
        groups = len(components(sum(np.abs(m) for m in mats)))
        if groups > 1:
            raise MixingError(
                f"the invariant vector is not unique: the agents split into {groups} groups that never "
                "hear from each other (the identity, i.e. no communication, is the extreme case)"
            )
    else:
        prod = mats[0]
        for m in mats[1:]:
            prod = prod @ m
        a, mult = _eig_one(prod)
        if mult > 1:
            raise MixingError(
                f"the invariant vector is not unique: eigenvalue 1 of the product has multiplicity {mult} "
                "(the agents split into groups that never hear from each other)"
            )
    for i, m in enumerate(mats):
        resid = float(np.max(np.abs(m @ a - a)))
        if resid > tol * 10:
            raise MixingError(
                f"no common invariant vector: matrix {i} moves the period's invariant vector a by {resid:.3g} "
                f"(P a != a), so y_k = X_k a is not preserved step by step; a = {np.round(a, 6).tolist()}"
            )
    return a


def consensus_rate(P, a=None) -> float:
    """Consensus rate of one column-stochastic matrix: rho(P - a 1^T).

    a is P's invariant vector (P a = a, 1^T a = 1), computed if not given.
    X_{k+1} = X_k P contracts the disagreement X_k - (X_k a) 1^T by this factor
    per application: X_k (I - a 1^T) P = X_k (I - a 1^T)(P - a 1^T). A value < 1
    means consensus is reached; a value >= 1 means it is not (e.g. the identity,
    rate 1). For a row-stochastic (push-sum) matrix pass P^T.
    """
    M = as_matrix(P)
    n = M.shape[0]
    if a is None:
        if _is_doubly_stochastic(M, DEFAULT_TOL):
            a = np.full(n, 1.0 / n)
        else:
            a, _ = _eig_one(M)
    a = np.asarray(a, dtype=np.float64)
    E = M - np.outer(a, np.ones(n))
    return float(np.max(np.abs(np.linalg.eigvals(E))))


@dataclass(frozen=True, eq=False)
class Phase:
    """One matrix of a schedule, applied ``repeat`` consecutive steps."""

    matrix: np.ndarray
    repeat: int = 1
    name: str = ""

    @property
    def is_identity(self) -> bool:
        return bool(np.array_equal(self.matrix, np.eye(self.matrix.shape[0])))


class Schedule:
    """A periodic sequence of mixing matrices P_0, P_1, ... (paper eq. 5 is one).

    Built from phases, each a matrix applied ``repeat`` consecutive steps; the
    period is the sum of the repeats and P_k = the phase that covers k mod period.
    Column-stochastic by default; ``push_sum=True`` for row-stochastic
    (sum-preserving) schedules.

    >>> s = lookahead_schedule(alpha=0.5, tau=3)
    >>> s.period, s.matrix(0).tolist(), s.matrix(2).tolist()
    (3, [[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]])
    """

    def __init__(
        self,
        phases: Iterable[Phase | np.ndarray | Sequence],
        *,
        push_sum: bool = False,
        tol: float = DEFAULT_TOL,
        name: str = "",
    ):
        self.push_sum = bool(push_sum)
        self.name = name
        checked: list[Phase] = []
        for i, ph in enumerate(phases):
            if not isinstance(ph, Phase):
                ph = Phase(as_matrix(ph, name=f"phase {i}"))
            label = f"phase {i}" + (f" ({ph.name})" if ph.name else "")
            check = check_row_stochastic if self.push_sum else check_column_stochastic
            M = check(ph.matrix, tol, name=label)
            if not isinstance(ph.repeat, (int, np.integer)) or isinstance(ph.repeat, bool) or ph.repeat < 1:
                raise MixingError(f"{label}: repeat must be an integer >= 1, got {ph.repeat!r}")
            M.setflags(write=False)
            checked.append(Phase(M, int(ph.repeat), ph.name))
        if not checked:
            raise MixingError("a schedule needs at least one phase, got none")
        sizes = {p.matrix.shape[0] for p in checked}
        if len(sizes) > 1:
            raise MixingError(f"every phase must have the same number of agents, got sizes {sorted(sizes)}")
        self.phases: tuple[Phase, ...] = tuple(checked)
        self.n = checked[0].matrix.shape[0]
        self.period = sum(p.repeat for p in checked)
        self._starts = np.cumsum([0] + [p.repeat for p in checked])

    # -- construction helpers -------------------------------------------------
    @classmethod
    def static(cls, P, **kw) -> "Schedule":
        return cls([P], **kw)

    @classmethod
    def cyclic(cls, matrices: Sequence, **kw) -> "Schedule":
        return cls(list(matrices), **kw)

    # -- indexing ---------------------------------------------------------------
    def phase_index(self, k: int) -> int:
        """Index into ``phases`` of the phase applied at step k."""
        if k < 0:
            raise MixingError(f"step k must be >= 0, got {k}")
        return int(np.searchsorted(self._starts, k % self.period, side="right") - 1)

    def matrix(self, k: int) -> np.ndarray:
        """P_k (read-only)."""
        return self.phases[self.phase_index(k)].matrix

    def __getitem__(self, k: int) -> np.ndarray:
        return self.matrix(k)

    def __len__(self) -> int:
        return self.period

    def is_identity(self, k: int) -> bool:
        return self.phases[self.phase_index(k)].is_identity

    # -- algebra ----------------------------------------------------------------
    def period_product(self) -> np.ndarray:
        """Pi = P_0 P_1 ... P_{period-1}: X_{period} = X_0 Pi without gradients."""
        Pi = np.eye(self.n)
        for ph in self.phases:
            Pi = Pi @ np.linalg.matrix_power(ph.matrix, ph.repeat)
        return Pi

    def invariant_vector(self, tol: float = 1e-9) -> np.ndarray:
        """a with P_k a = a for every k and 1^T a = 1 (for push-sum: a = 1/n, since P_k 1 = 1)."""
        if self.push_sum:
            for i, ph in enumerate(self.phases):
                if np.max(np.abs(ph.matrix.sum(axis=1) - 1)) > tol:
                    raise MixingError(f"phase {i}: not row-stochastic")
            return np.full(self.n, 1.0 / self.n)
        return invariant_vector(self, tol)

    def consensus_rate(self, per_step: bool = False) -> float:
        """rho(Pi - a 1^T) for the period product Pi (Pi^T for push-sum); ``per_step``: its 1/period power.

        The schedule reaches consensus iff this is < 1.
        """
        Pi = self.period_product()
        if self.push_sum:
            Pi = Pi.T
        rate = consensus_rate(Pi)
        return rate ** (1.0 / self.period) if per_step else rate

    def fingerprint(self) -> str:
        """A hash of the schedule's exact matrices, repeats and push-sum flag (compared across ranks)."""
        h = hashlib.sha256()
        h.update(f"n={self.n};push_sum={self.push_sum};".encode())
        for ph in self.phases:
            h.update(f"repeat={ph.repeat};".encode())
            h.update(np.ascontiguousarray(ph.matrix, dtype="<f8").tobytes())
        return h.hexdigest()

    def __repr__(self) -> str:
        kind = "push-sum" if self.push_sum else "column-stochastic"
        return f"Schedule(n={self.n}, period={self.period}, phases={len(self.phases)}, {kind})"


def lookahead_schedule(alpha: float, tau: int) -> Schedule:
    """Serial Lookahead as a two-agent schedule (paper eq. 5).

    P_k = a 1^T when (k + 1) mod tau == 0, else I, with a = [alpha, 1 - alpha].
    """
    tau = check_tau(tau, error=MixingError)
    phases = []
    if tau > 1:
        phases.append(Phase(np.eye(2), tau - 1, "local"))
    phases.append(Phase(lookahead_matrix(alpha), 1, "sync"))
    return Schedule(phases, name=f"lookahead(alpha={alpha}, tau={tau})")
