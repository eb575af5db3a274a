"""Mixing matrices and schedules: the algebra of X_{k+1} = (X_k - G_k) P_k.

Length: about 530 lines: every number a schedule is validated by (invariant vector, consensus rate,
fingerprint), each with its dense small-n form and its sparse large-n form side by side, so that the two can
be read against each other.

Convention (paper eq. 4): agents are the **columns** of X_k = [x_1, ..., x_n].
P_k is n x n, non-negative and **column-stochastic**: column j holds the
weights agent j takes from every agent, so agent j's new value is
sum_i P_k[i, j] x_i and every column sums to 1.

Push-sum (sum-preserving) schedules are **row-stochastic** instead: row i
holds how agent i splits its mass among the receivers, so X_k 1 is preserved.

Everything here is float64 NumPy/SciPy; nothing touches torch.

A phase is stored and checked by :mod:`lookahead_dist.phase` (dense, sparse or an averaging block,
and the size limits); the names are re-exported here.

Where each number comes from
----------------------------
* stochasticity: column (row) sums and entry signs over the stored entries, O(nnz);
  a dense input is checked by the dense check, as before.
* invariant vector a: doubly stochastic phases (every built-in) give a = 1/n, unique
  iff the union graph is connected (sparse connected components, O(nnz)); otherwise,
  up to :data:`DENSE_SPECTRAL_AGENTS` agents, the dense eigenvector of the period
  product, and above it a sparse LU solve of (M - I) a = 0, 1^T a = 1 with M the
  mean of the phases, checked against every phase.
* consensus rate rho(Pi - a 1^T): when every phase is (block-)circulant for one
  index shape (ring, torus, exponential, one-peer exponential, hypercube on
  (2, ..., 2), hierarchical over a ring or exponential, complete) the closed form:
  the phases share the Fourier eigenvectors, so the eigenvalues of Pi are the
  products of each phase's DFT of its first column (checked entry by entry in
  O(nnz) before it is used); otherwise the dense eigenvalues up to
  DENSE_SPECTRAL_AGENTS agents, and above it ARPACK (``scipy.sparse.linalg.eigs``)
  on v -> Pi v - a 1^T v applied as sparse products.
* fingerprint: up to :data:`DENSE_FINGERPRINT_AGENTS` agents the hash of the dense
  float64 bytes, streamed row block by row block (the same hash as before, so
  checkpoints keep matching); above, the hash of the stored sparse form.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np
import scipy.sparse as sp
from scipy.sparse import csgraph
from scipy.sparse import linalg as splinalg

from lookahead_dist.errors import MixingError
from lookahead_dist.phase import (
    DEFAULT_TOL,
    DENSE_FINGERPRINT_AGENTS,
    MAX_DENSE_AGENTS,
    MAX_NONZEROS,
    Averaging,
    Phase,
    _check_phase,
    as_matrix,
    check_column_stochastic,
    check_phase,
    check_row_stochastic,
    circulant_spectrum,
    is_column_stochastic,
    is_row_stochastic,
    weight_problem,
)
from lookahead_dist.validation import check_mixing_alpha, check_tau

#: Up to this many agents, invariant vectors and consensus rates of schedules without a closed form use the
#: dense eigendecomposition (0.1 s at 512); above, sparse iterative methods.
DENSE_SPECTRAL_AGENTS = 512
#: The most stored entries one application of the period product may touch in the iterative consensus rate
#: (ARPACK applies it some hundred times).
MAX_PRODUCT_WORK = 2**28

__all__ = [
    "DEFAULT_TOL",
    "DENSE_FINGERPRINT_AGENTS",
    "DENSE_SPECTRAL_AGENTS",
    "MAX_DENSE_AGENTS",
    "MAX_NONZEROS",
    "Averaging",
    "Phase",
    "Schedule",
    "as_matrix",
    "check_column_stochastic",
    "check_phase",
    "check_row_stochastic",
    "circulant_spectrum",
    "components",
    "consensus_rate",
    "invariant_vector",
    "is_column_stochastic",
    "is_row_stochastic",
    "lookahead_matrix",
    "lookahead_schedule",
    "weight_problem",
]


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

    The direction of an edge is ignored. ``P`` is a dense matrix or a :class:`Phase` (O(nnz), never densified).
    """
    ph = P if isinstance(P, Phase) else Phase(np.asarray(P))
    labels, count = _component_labels(ph)
    order = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[order], np.arange(count + 1))
    return [order[starts[c] : starts[c + 1]].tolist() for c in range(count)]


def _component_labels(ph: "Phase") -> tuple[np.ndarray, int]:
    """(label of every agent, number of components), labels numbered in order of each component's smallest agent."""

    def build():
        n = ph.n
        if ph.averaging is not None:
            labels = ph.averaging.labels()
            return labels, int(labels.max()) + 1
        rows, cols = ph.entries()[:2]
        off = rows != cols
        g = sp.coo_array((np.ones(int(off.sum()), dtype=np.int8), (rows[off], cols[off])), shape=(n, n))
        count, raw = csgraph.connected_components(g, directed=True, connection="weak")
        first = np.full(count, n, dtype=np.int64)
        np.minimum.at(first, raw, np.arange(n))
        rank = np.empty(count, dtype=np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(count)
        return rank[raw], int(count)

    return ph.memo("components", build)


def _dense_is_doubly_stochastic(M: np.ndarray, tol: float) -> bool:
    return bool(np.all(np.abs(M.sum(axis=0) - 1) <= tol) and np.all(np.abs(M.sum(axis=1) - 1) <= tol))


def _not_unique(groups: int) -> MixingError:
    return MixingError(
        f"the invariant vector is not unique: the agents split into {groups} groups that never "
        "hear from each other (the identity, i.e. no communication, is the extreme case)"
    )


def _short(a: np.ndarray) -> str:
    if a.size <= 12:
        return str(np.round(a, 6).tolist())
    return f"[{a.size} entries from {a.min():.6g} to {a.max():.6g}]"


def _check_common(phases_or_mats, a: np.ndarray, tol: float) -> np.ndarray:
    for i, m in enumerate(phases_or_mats):
        moved = m.matvec(a) if isinstance(m, Phase) else m @ a
        resid = float(np.max(np.abs(moved - a)))
        if resid > tol * 10:
            raise MixingError(
                f"no common invariant vector: matrix {i} moves the period's invariant vector a by {resid:.3g} "
                f"(P a != a), so y_k = X_k a is not preserved step by step; a = {_short(a)}"
            )
    return a


def _dense_invariant(mats: list, tol: float) -> np.ndarray:
    """The invariant vector of dense matrices: 1/n when doubly stochastic, else the eigenvector of their product."""
    n = mats[0].shape[0]
    if n == 1:
        return np.ones(1)
    if all(_dense_is_doubly_stochastic(m, tol) for m in mats):
        a = np.full(n, 1.0 / n)
        # For doubly stochastic matrices the invariant vector is unique iff the union graph is connected.
        groups = len(components(sum(np.abs(m) for m in mats)))
        if groups > 1:
            raise _not_unique(groups)
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
    return _check_common(mats, a, tol)


def _sparse_invariant(phases: list, tol: float) -> np.ndarray:
    """The invariant vector of sparse phases, never densified (see the module docstring for the methods)."""
    n = phases[0].n
    if n == 1:
        return np.ones(1)
    if all(ph.is_doubly_stochastic(tol) for ph in phases):
        a = np.full(n, 1.0 / n)
        parts = [_component_edges(ph) for ph in phases]
        rows, cols = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        g = sp.coo_array((np.ones(rows.size, dtype=np.int8), (rows, cols)), shape=(n, n))
        groups = csgraph.connected_components(g, directed=False)[0]
        if groups > 1:
            raise _not_unique(groups)
        return _check_common(phases, a, tol)
    M = sum(ph.csc for ph in phases) / len(phases)  # a is invariant for every phase iff for their mean, when unique
    A = (M - sp.identity(n, format="csc")).tocsr()
    A = sp.vstack([sp.csr_array(np.ones((1, n))), A[1:]]).tocsc()  # row 0 of M - I is minus the sum of the others
    rhs = np.zeros(n)
    rhs[0] = 1.0
    try:
        a = splinalg.spsolve(A, rhs)
    except RuntimeError:  # "Factor is exactly singular"
        a = np.full(n, np.nan)
    if not np.all(np.isfinite(a)) or float(np.max(np.abs(A @ a - rhs))) > 1e-8:
        raise MixingError(
            "the invariant vector is not unique: the mean of the phases has eigenvalue 1 more than once "
            "(the agents split into groups that never hear from each other)"
        )
    a[np.abs(a) < 1e-15] = 0.0
    return _check_common(phases, a, tol)


def _component_edges(ph: "Phase") -> tuple[np.ndarray, np.ndarray]:
    """Edges with the connectivity of ph's graph: its entries, or each averaging group as a star."""
    if ph.averaging is not None:
        labels = ph.averaging.labels()
        first = np.full(int(labels.max()) + 1, ph.n, dtype=np.int64)
        np.minimum.at(first, labels, np.arange(ph.n))
        return np.arange(ph.n), first[labels]
    rows, cols = ph.entries()[:2]
    return rows, cols


def invariant_vector(matrices, tol: float = 1e-9) -> np.ndarray:
    """The vector a with P a = a for every given P, 1^T a = 1 (paper eqs. 6-8).

    ``matrices`` is a matrix, a list of matrices or a :class:`Schedule`. With it,
    y_k = X_k a obeys y_{k+1} = y_k - G_k a exactly. Doubly stochastic matrices
    give a = 1/n exactly. Raises :class:`MixingError` when the matrices share no
    such vector, or when it is not unique (e.g. the identity: no communication).
    A schedule of more than :data:`DENSE_SPECTRAL_AGENTS` agents is solved
    sparsely (module docstring); dense matrices always densely.
    """
    if isinstance(matrices, Schedule):
        if matrices.n > DENSE_SPECTRAL_AGENTS:
            return _sparse_invariant(list(matrices.phases), tol)
        mats = [p.matrix for p in matrices.phases]
    elif isinstance(matrices, np.ndarray) and matrices.ndim == 2:
        mats = [matrices]
    else:
        mats = [np.asarray(m, dtype=np.float64) for m in matrices]
    return _dense_invariant(mats, tol)


def consensus_rate(P, a=None) -> float:
    """Consensus rate of one column-stochastic matrix: rho(P - a 1^T), by its dense eigenvalues.

    a is P's invariant vector (P a = a, 1^T a = 1), computed if not given.
    X_{k+1} = X_k P contracts the disagreement X_k - (X_k a) 1^T by this factor
    per application: X_k (I - a 1^T) P = X_k (I - a 1^T)(P - a 1^T). A value < 1
    means consensus is reached; a value >= 1 means it is not (e.g. the identity,
    rate 1). For a row-stochastic (push-sum) matrix pass P^T. For a large
    schedule use :meth:`Schedule.consensus_rate`, which never densifies.
    """
    M = as_matrix(P)
    n = M.shape[0]
    if a is None:
        if _dense_is_doubly_stochastic(M, DEFAULT_TOL):
            a = np.full(n, 1.0 / n)
        else:
            a, _ = _eig_one(M)
    a = np.asarray(a, dtype=np.float64)
    E = M - np.outer(a, np.ones(n))
    return float(np.max(np.abs(np.linalg.eigvals(E))))


def _circulant_rate(phases: Sequence[Phase]) -> float | None:
    """rho(Pi - J/n) from the DFT when every phase is circulant for one index shape, else None."""
    n = phases[0].n
    active = [ph for ph in phases if not ph.is_identity]
    if not active:
        return 1.0 if n > 1 else 0.0
    shapes = list(dict.fromkeys([ph.shape for ph in active if ph.shape] + [(n,)]))
    for shape in shapes:
        prod = np.ones(n, dtype=complex)
        for ph in active:
            eig = circulant_spectrum(ph, shape)
            if eig is None:
                break
            prod *= eig**ph.repeat
        else:
            return float(np.max(np.abs(prod[1:]))) if n > 1 else 0.0
    return None


def _iterative_rate(s: "Schedule") -> float:
    """rho(Pi - u 1^T) by ARPACK on v -> Pi v - u (1^T v), Pi applied as sparse products (push-sum: Pi^T).

    1^T is a left eigenvector of the column-stochastic Pi (eigenvalue 1), so by Brauer's theorem
    Pi - u 1^T has the eigenvalues of Pi with that 1 replaced by 1 - 1^T u = 0, for any u with
    1^T u = 1: u = 1/n gives rho(Pi - a 1^T) without computing a.
    """
    n = s.n
    steps = [ph for ph in s.phases if not ph.is_identity]
    work = sum(ph.repeat * ph.nnz for ph in steps)
    if work > MAX_PRODUCT_WORK:
        raise MixingError(
            f"the consensus rate of this schedule of {n} agents needs {work} stored entries per product of its "
            f"period, beyond the limit MAX_PRODUCT_WORK = {MAX_PRODUCT_WORK}"
        )

    def apply(v):
        v = np.asarray(v, dtype=np.float64).ravel()
        mean = v.sum() / n
        if s.push_sum:  # Pi^T = P_{K-1}^T ... P_0^T: P_0^T first
            for ph in steps:
                for _ in range(ph.repeat):
                    v = ph.rmatvec(v)
        else:  # Pi = P_0 ... P_{K-1}: P_{K-1} first
            for ph in reversed(steps):
                for _ in range(ph.repeat):
                    v = ph.matvec(v)
        return v - mean

    v0 = np.random.default_rng(0).standard_normal(n)
    w = apply(v0)
    if np.linalg.norm(w) <= 1e-13 * np.linalg.norm(v0):
        w2 = apply(np.random.default_rng(1).standard_normal(n))
        if np.linalg.norm(w2) <= 1e-13 * np.sqrt(n):
            return 0.0
    op = splinalg.LinearOperator((n, n), matvec=apply, dtype=np.float64)
    try:  # a wide Krylov space: directed graphs have many eigenvalues of nearly the largest magnitude
        vals = splinalg.eigs(
            op, k=1, which="LM", v0=v0, ncv=min(n - 1, 128), tol=1e-12, maxiter=20 * n, return_eigenvectors=False
        )
    except splinalg.ArpackNoConvergence:
        if n > MAX_DENSE_AGENTS:
            raise MixingError(
                f"the consensus rate of this schedule of {n} agents did not converge (ARPACK), and {n} agents "
                f"exceed the dense fallback's limit MAX_DENSE_AGENTS = {MAX_DENSE_AGENTS}"
            ) from None
        Pi = s.period_product()
        return consensus_rate(Pi.T if s.push_sum else Pi)
    return float(np.max(np.abs(vals)))


class Schedule:
    """A periodic sequence of mixing matrices P_0, P_1, ... (paper eq. 5 is one).

    Built from phases, each a matrix applied ``repeat`` consecutive steps; the
    period is the sum of the repeats and P_k = the phase that covers k mod period.
    Column-stochastic by default; ``push_sum=True`` for row-stochastic
    (sum-preserving) schedules. A phase given dense is checked by the dense
    checks; a sparse or averaging one in O(its stored entries).

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
                ph = Phase(ph if sp.issparse(ph) or isinstance(ph, Averaging) else as_matrix(ph, name=f"phase {i}"))
            label = f"phase {i}" + (f" ({ph.name})" if ph.name else "")
            if ph.given_dense:
                check = check_row_stochastic if self.push_sum else check_column_stochastic
                M = check(ph.matrix, tol, name=label)
                M.setflags(write=False)
                store = M
            else:
                _check_phase(ph, 1 if self.push_sum else 0, tol, label)
                store = ph
            if not isinstance(ph.repeat, (int, np.integer)) or isinstance(ph.repeat, bool) or ph.repeat < 1:
                raise MixingError(f"{label}: repeat must be an integer >= 1, got {ph.repeat!r}")
            checked.append(Phase(store, int(ph.repeat), ph.name, shape=ph.shape))
        if not checked:
            raise MixingError("a schedule needs at least one phase, got none")
        sizes = {p.n for p in checked}
        if len(sizes) > 1:
            raise MixingError(f"every phase must have the same number of agents, got sizes {sorted(sizes)}")
        self.phases: tuple[Phase, ...] = tuple(checked)
        self.n = checked[0].n
        self.period = sum(p.repeat for p in checked)
        self._starts = np.cumsum([0] + [p.repeat for p in checked])
        self._rate: float | None = None

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
        """P_k, dense (read-only; up to :data:`MAX_DENSE_AGENTS` agents)."""
        return self.phases[self.phase_index(k)].matrix

    def __getitem__(self, k: int) -> np.ndarray:
        return self.matrix(k)

    def __len__(self) -> int:
        return self.period

    def is_identity(self, k: int) -> bool:
        return self.phases[self.phase_index(k)].is_identity

    # -- algebra ----------------------------------------------------------------
    def period_product(self) -> np.ndarray:
        """Pi = P_0 P_1 ... P_{period-1}: X_{period} = X_0 Pi without gradients (dense, up to MAX_DENSE_AGENTS)."""
        Pi = np.eye(self.n)
        for ph in self.phases:
            Pi = Pi @ np.linalg.matrix_power(ph.matrix, ph.repeat)
        return Pi

    def invariant_vector(self, tol: float = 1e-9) -> np.ndarray:
        """a with P_k a = a for every k and 1^T a = 1 (for push-sum: a = 1/n, since P_k 1 = 1)."""
        if self.push_sum:
            for i, ph in enumerate(self.phases):
                if np.max(np.abs(ph.sums(1) - 1)) > tol:
                    raise MixingError(f"phase {i}: not row-stochastic")
            return np.full(self.n, 1.0 / self.n)
        return invariant_vector(self, tol)

    def consensus_rate(self, per_step: bool = False) -> float:
        """rho(Pi - a 1^T) for the period product Pi (Pi^T for push-sum); ``per_step``: its 1/period power.

        The schedule reaches consensus iff this is < 1. The closed form for (block-)circulant
        phases, else dense eigenvalues up to DENSE_SPECTRAL_AGENTS agents, else ARPACK (module docstring).
        """
        if self._rate is None:
            rate = _circulant_rate(self.phases)
            if rate is None and self.n <= DENSE_SPECTRAL_AGENTS:
                Pi = self.period_product()
                rate = consensus_rate(Pi.T if self.push_sum else Pi)
            elif rate is None:
                rate = _iterative_rate(self)
            self._rate = rate
        return self._rate ** (1.0 / self.period) if per_step else self._rate

    def fingerprint(self) -> str:
        """A hash of the schedule's exact matrices, repeats and push-sum flag (compared across ranks).

        Up to DENSE_FINGERPRINT_AGENTS agents: of the dense float64 bytes, row block by row block; above:
        of the stored form (CSC arrays, or an averaging block's sizes), so every rank must build it alike.
        """
        h = hashlib.sha256()
        h.update(f"n={self.n};push_sum={self.push_sum};".encode())
        for ph in self.phases:
            h.update(f"repeat={ph.repeat};".encode())
            if ph.given_dense:
                h.update(np.ascontiguousarray(ph.matrix, dtype="<f8").tobytes())
            elif self.n <= DENSE_FINGERPRINT_AGENTS:
                R = ph.csr
                for lo in range(0, self.n, 256):
                    h.update(np.ascontiguousarray(R[lo : lo + 256].toarray(), dtype="<f8").tobytes())
            elif ph.averaging is not None:
                h.update(f"averaging={ph.averaging.a},{ph.averaging.b},{ph.averaging.c};".encode())
            else:
                C = ph.csc
                for arr, dt in ((C.indptr, "<i8"), (C.indices, "<i8"), (C.data, "<f8")):
                    h.update(np.ascontiguousarray(arr, dtype=dt).tobytes())
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
