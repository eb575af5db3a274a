"""Mixing matrices and schedules: the algebra of X_{k+1} = (X_k - G_k) P_k.

Length: about 700 lines: the matrix checks, the two ways a phase is stored (dense, sparse or an averaging
block) and every number a schedule is validated by (invariant vector, consensus rate, fingerprint), each with
its dense small-n form and its sparse large-n form side by side, so that the two can be read against each other.

Convention (paper eq. 4): agents are the **columns** of X_k = [x_1, ..., x_n].
P_k is n x n, non-negative and **column-stochastic**: column j holds the
weights agent j takes from every agent, so agent j's new value is
sum_i P_k[i, j] x_i and every column sums to 1.

Push-sum (sum-preserving) schedules are **row-stochastic** instead: row i
holds how agent i splits its mass among the receivers, so X_k 1 is preserved.

Everything here is float64 NumPy/SciPy; nothing touches torch.

Storage and limits
------------------
A :class:`Phase` holds its matrix in the form it was given: dense (a NumPy
array, e.g. a YAML ``matrix:``), sparse (``scipy.sparse``, what every built-in
generator and edge list builds: O(n x degree) memory), or an
:class:`Averaging` block kron(I_a, J_b / b, I_c) (exact averaging inside
groups: ``complete`` and the intra-node phase of ``hierarchical``), which needs
O(1) memory even for one group of 65,536 agents. ``Phase.matrix`` (dense)
still works up to :data:`MAX_DENSE_AGENTS` = 4096 agents (128 MiB per matrix)
and is refused above with a :class:`MixingError` naming the size and the limit.

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
import math
from typing import Iterable, Sequence

import numpy as np
import scipy.sparse as sp
from scipy.sparse import csgraph
from scipy.sparse import linalg as splinalg

from lookahead_dist.errors import MixingError
from lookahead_dist.validation import check_mixing_alpha, check_tau

DEFAULT_TOL = 1e-9
#: The most agents a dense n x n matrix (``Phase.matrix``, ``Schedule.matrix``, ``period_product``) may have:
#: 128 MiB of float64 at 4096. Larger phases are used through their sparse form (``Phase.csc``, ``column``, ``row``).
MAX_DENSE_AGENTS = 4096
#: Up to this many agents, invariant vectors and consensus rates of schedules without a closed form use the
#: dense eigendecomposition (0.1 s at 512); above, sparse iterative methods.
DENSE_SPECTRAL_AGENTS = 512
#: Up to this many agents (the former limit of every topology), the fingerprint hashes the dense bytes.
DENSE_FINGERPRINT_AGENTS = 2048
#: The most stored entries a sparse form may have (an averaging block of b agents stores b entries per column):
#: 2^26 entries are 800 MB as a sparse matrix.
MAX_NONZEROS = 2**26
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


class Averaging:
    """Exact averaging inside groups: P = kron(I_a, J_b / b, I_c), n = a b c agents.

    Agent i = (u, k, w) in the index shape (a, b, c) takes 1/b from each of the b agents
    (u, 0 .. b - 1, w): ``complete`` is (1, n, 1), the intra-node phase of ``hierarchical``
    (nodes, per_node, 1), exact averaging of equal local indices across nodes (1, nodes, per_node).
    Held as its three sizes, O(1) memory; symmetric and doubly stochastic.
    """

    __slots__ = ("a", "b", "c")

    def __init__(self, a: int, b: int, c: int = 1):
        self.a, self.b, self.c = int(a), int(b), int(c)

    @property
    def n(self) -> int:
        return self.a * self.b * self.c

    def labels(self) -> np.ndarray:
        """The group of every agent, groups numbered in order of their smallest agent."""
        i = np.arange(self.n)
        return (i // (self.b * self.c)) * self.c + i % self.c

    def group_of(self, i: int) -> int:
        return (int(i) // (self.b * self.c)) * self.c + int(i) % self.c

    def members(self, group: int) -> np.ndarray:
        u, w = divmod(int(group), self.c)
        return u * self.b * self.c + w + self.c * np.arange(self.b)

    def spectrum(self, shape: tuple) -> np.ndarray | None:
        """Eigenvalues on the DFT grid of ``shape``: 1 where the frequency along b is 0, else 0."""
        n = self.n
        if self.b == 1:
            return np.ones(n, dtype=complex)
        if self.b == n:
            eig = np.zeros(n, dtype=complex)
            eig[0] = 1.0
            return eig
        if tuple(d for d in (self.a, self.b, self.c) if d > 1) != tuple(d for d in shape if d > 1):
            return None
        eig = np.zeros((self.a, self.b, self.c), dtype=complex)
        eig[:, 0, :] = 1.0
        return eig.ravel()

    def __repr__(self) -> str:
        return f"Averaging(a={self.a}, b={self.b}, c={self.c})"


def _canonical(M) -> sp.csc_array:
    """A float64 CSC copy with sorted indices, duplicates summed and explicit zeros dropped."""
    C = sp.csc_array(M, dtype=np.float64, copy=True)
    C.sum_duplicates()
    C.eliminate_zeros()
    C.sort_indices()
    return C


class Phase:
    """One matrix of a schedule, applied ``repeat`` consecutive steps.

    ``matrix`` is a dense matrix (array, nested lists, tensor), a ``scipy.sparse`` matrix, an
    :class:`Averaging` block or another Phase (whose storage is shared). ``shape`` optionally
    names an index shape the matrix is (block-)circulant for (a hint for the closed-form
    consensus rate; it is checked, never trusted). Phases are immutable.

    * ``matrix``: the dense n x n array (built on first use; refused above :data:`MAX_DENSE_AGENTS`);
    * ``csc`` / ``csr``: the sparse forms; ``column(j)`` / ``row(i)``: one column or row in O(its degree);
    * ``entries()``: (rows, cols, values) of the stored entries.
    """

    __slots__ = ("repeat", "name", "shape", "_dense", "_given_dense", "_csc", "_avg", "_memo")

    def __init__(self, matrix, repeat: int = 1, name: str = "", *, shape: tuple | None = None):
        set_ = object.__setattr__
        set_(self, "repeat", repeat)
        set_(self, "name", name)
        if isinstance(matrix, Phase):
            for slot in ("_dense", "_given_dense", "_csc", "_avg", "_memo"):
                set_(self, slot, getattr(matrix, slot))
            set_(self, "shape", shape or matrix.shape)
            return
        set_(self, "shape", tuple(int(d) for d in shape) if shape else None)
        set_(self, "_memo", {})
        set_(self, "_avg", matrix if isinstance(matrix, Averaging) else None)
        set_(self, "_csc", _canonical(matrix) if sp.issparse(matrix) else None)
        dense = None if isinstance(matrix, Averaging) or sp.issparse(matrix) else matrix
        set_(self, "_dense", dense)
        set_(self, "_given_dense", dense is not None)

    def __setattr__(self, key, value):
        raise AttributeError(f"Phase is immutable (cannot set {key})")

    def __getstate__(self):
        return {slot: getattr(self, slot) for slot in Phase.__slots__}

    def __setstate__(self, state):  # pickle and copy: through object.__setattr__, as __init__
        for slot, value in state.items():
            object.__setattr__(self, slot, value)

    def __repr__(self) -> str:
        form = "averaging" if self._avg is not None else "dense" if self._given_dense else "sparse"
        return f"Phase(n={self.n}, repeat={self.repeat!r}, name={self.name!r}, {form})"

    def memo(self, key, build):
        """``build()``, computed once per phase and shared by every Phase that shares this one's storage."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    # -- forms -----------------------------------------------------------------------
    @property
    def n(self) -> int:
        if self._avg is not None:
            return self._avg.n
        if self._csc is not None:
            return self._csc.shape[0]
        return int(np.shape(self._dense)[0])

    @property
    def averaging(self) -> Averaging | None:
        return self._avg

    @property
    def given_dense(self) -> bool:
        """True when the matrix was given dense (then it is checked by the dense checks)."""
        return self._given_dense

    @property
    def matrix(self) -> np.ndarray:
        """The dense n x n matrix (read-only; refused above :data:`MAX_DENSE_AGENTS` agents)."""
        if self._dense is None:
            n = self.n
            if n > MAX_DENSE_AGENTS:
                raise MixingError(
                    f"a dense matrix of {n} agents ({n * n * 8 / 2**30:.3g} GiB) exceeds the limit "
                    f"MAX_DENSE_AGENTS = {MAX_DENSE_AGENTS}; use the phase's sparse form (csc, column, row)"
                )
            M = self.csc.toarray()
            M.setflags(write=False)
            object.__setattr__(self, "_dense", M)
        return self._dense

    @property
    def csc(self) -> sp.csc_array:
        """The sparse form, column by column (column j = what agent j takes)."""
        if self._csc is None:
            if self._avg is not None:
                avg, n = self._avg, self._avg.n
                if n * avg.b > MAX_NONZEROS:
                    raise MixingError(
                        f"averaging groups of {avg.b} over {n} agents store {n * avg.b} entries as a sparse matrix, "
                        f"beyond the limit MAX_NONZEROS = {MAX_NONZEROS}"
                    )
                labels = avg.labels()
                order = np.argsort(labels, kind="stable").reshape(-1, avg.b)  # the members of each group
                cols = np.repeat(np.arange(n), avg.b)
                rows = order[labels].ravel()
                C = _canonical(sp.coo_array((np.full(rows.size, 1.0 / avg.b), (rows, cols)), shape=(n, n)))
            else:
                C = _canonical(as_matrix(self._dense))
            object.__setattr__(self, "_csc", C)
        return self._csc

    @property
    def csr(self) -> sp.csr_array:
        """The sparse form, row by row (row i = where agent i's value goes)."""
        return self.memo("csr", lambda: self.csc.tocsr())

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, cols, values) of the stored entries, column by column, rows ascending."""

        def build():
            C = self.csc
            cols = np.repeat(np.arange(C.shape[1]), np.diff(C.indptr))
            return C.indices.astype(np.int64), cols, C.data

        return self.memo("entries", build)

    @property
    def nnz(self) -> int:
        if self._avg is not None:
            return self._avg.n * self._avg.b
        return int(self.csc.nnz)

    def column(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(sources, weights) of receiver j, sources ascending, in O(its degree)."""
        if self._avg is not None:
            members = self._avg.members(self._avg.group_of(j))
            return members, np.full(members.size, 1.0 / self._avg.b)
        C = self.csc
        lo, hi = C.indptr[j], C.indptr[j + 1]
        return C.indices[lo:hi], C.data[lo:hi]

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(receivers, weights) of sender i, receivers ascending, in O(its degree)."""
        if self._avg is not None:
            return self.column(i)  # symmetric
        R = self.csr
        lo, hi = R.indptr[i], R.indptr[i + 1]
        return R.indices[lo:hi], R.data[lo:hi]

    @property
    def is_identity(self) -> bool:
        def build():
            if self._given_dense and self._dense is not None:
                M = np.asarray(self._dense)
                return bool(np.array_equal(M, np.eye(M.shape[0])))
            if self._avg is not None:
                return self._avg.b == 1
            C, n = self.csc, self.n
            return bool(C.nnz == n and np.array_equal(C.indices, np.arange(n)) and np.all(C.data == 1.0))

        return self.memo("identity", build)

    def digest(self) -> str:
        """A hash of the stored matrix (not of repeat or name), O(nnz): a key for caches across processes' runs."""

        def build():
            h = hashlib.sha256()
            if self._avg is not None:
                h.update(f"averaging={self._avg.a},{self._avg.b},{self._avg.c}".encode())
            else:
                C = self.csc
                h.update(f"csc n={self.n};".encode())
                for arr, dt in ((C.indptr, "<i8"), (C.indices, "<i8"), (C.data, "<f8")):
                    h.update(np.ascontiguousarray(arr, dtype=dt).tobytes())
            return h.hexdigest()

        return self.memo("digest", build)

    def shift_invariant(self, s: int) -> bool:
        """Is P[(i + s) mod n, (j + s) mod n] = P[i, j] for all i, j? O(nnz log nnz)."""
        n, s = self.n, int(s) % self.n
        if s == 0:
            return True
        if self._avg is not None:
            avg = self._avg
            return avg.a == 1 or s % (avg.b * avg.c) == 0  # the groups i % c always; the blocks of b c agents
        rows, cols, vals = self.entries()  # sorted by (col, row)
        r2, c2 = (rows + s) % n, (cols + s) % n
        order = np.lexsort((r2, c2))
        return bool(
            np.array_equal(r2[order], rows) and np.array_equal(c2[order], cols) and np.array_equal(vals[order], vals)
        )

    # -- algebra ---------------------------------------------------------------------
    def sums(self, axis: int) -> np.ndarray:
        """Column sums (axis 0) or row sums (axis 1), over the stored entries."""

        def build():
            if self._avg is not None:
                return np.full(self.n, float(np.full(self._avg.b, 1.0 / self._avg.b).sum()))
            rows, cols, vals = self.entries()
            return np.bincount(cols if axis == 0 else rows, weights=vals, minlength=self.n)

        return self.memo(("sums", axis), build)

    def is_doubly_stochastic(self, tol: float) -> bool:
        return bool(np.all(np.abs(self.sums(0) - 1) <= tol) and np.all(np.abs(self.sums(1) - 1) <= tol))

    def matvec(self, v: np.ndarray) -> np.ndarray:
        """P v."""
        if self._avg is not None:
            avg = self._avg
            V = v.reshape(avg.a, avg.b, avg.c)
            return np.broadcast_to(V.sum(axis=1, keepdims=True) / avg.b, V.shape).ravel()
        return self.csc @ v

    def rmatvec(self, v: np.ndarray) -> np.ndarray:
        """P^T v."""
        if self._avg is not None:
            return self.matvec(v)
        return self.csc.T @ v


def check_phase(ph: Phase, tol: float = DEFAULT_TOL, name: str = "P", push_sum: bool = False) -> None:
    """Check one phase: the dense checks for a phase given dense, else O(nnz) checks of its stored entries."""
    if ph.given_dense:
        (check_row_stochastic if push_sum else check_column_stochastic)(ph.matrix, tol, name)
    else:
        _check_phase(ph, 1 if push_sum else 0, tol, name)


def _check_phase(ph: Phase, axis: int, tol: float, name: str) -> None:
    """Finite, non-negative stored entries and every column (axis 0) or row (axis 1) summing to 1, in O(nnz)."""
    if ph.averaging is None:
        rows, cols, vals = ph.entries()
        bad = np.flatnonzero(~np.isfinite(vals) | (vals < 0))
        if bad.size:
            k = bad[np.lexsort((cols[bad], rows[bad]))[0]]  # the first in row-major order, as the dense check
            x = float(vals[k])
            raise MixingError(f"{name}: entry [{int(rows[k])}, {int(cols[k])}] is {x!r}: {weight_problem(x)}")
    sums = ph.sums(axis)
    bad = np.flatnonzero(np.abs(sums - 1.0) > tol)
    if bad.size:
        i = int(bad[0])
        what, why = _SUM_RULES[axis]
        raise MixingError(f"{name}: {what} {i} sums to {float(sums[i])!r}, not 1 (tol {tol:g}); {why.format(i=i)}")


def circulant_spectrum(ph: Phase, shape: tuple) -> np.ndarray | None:
    """The eigenvalues of ph on the DFT grid of the index ``shape`` (flattened), or None if ph is not circulant for it.

    ph is (block-)circulant for ``shape`` when P[i, j] = c[(i - j) mod shape] (multi-indices, c its
    first column): checked on every stored entry, O(nnz). Its eigenvectors are then the Fourier
    modes and its eigenvalues the DFT of c, the same modes for every phase circulant for ``shape``.
    """
    shape = tuple(int(d) for d in shape)

    def build():
        if ph.averaging is not None:
            return ph.averaging.spectrum(shape)
        n = ph.n
        if math.prod(shape) != n:
            return None
        src, w = ph.column(0)
        c = np.zeros(n)
        c[src] = w
        rows, cols, vals = ph.entries()
        if rows.size != n * src.size:
            return None
        if len(shape) == 1:
            diff = (rows - cols) % n
        else:
            ri, ci = np.unravel_index(rows, shape), np.unravel_index(cols, shape)
            diff = np.ravel_multi_index(tuple((r - q) % d for r, q, d in zip(ri, ci, shape)), shape)
        if not np.array_equal(c[diff], vals):
            return None
        return np.fft.fftn(c.reshape(shape)).ravel()

    return ph.memo(("spectrum", shape), build)


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
