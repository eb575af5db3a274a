"""One mixing matrix: how a phase is stored and checked.

A :class:`Phase` is one matrix P of a schedule (see :mod:`lookahead_dist.mixing`
for the schedules and the numbers they are validated by).

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

The dense checks (:func:`check_column_stochastic`, :func:`check_row_stochastic`)
read every entry of a dense matrix; :func:`check_phase` checks a phase in the
form it is stored, over its stored entries.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import scipy.sparse as sp

from lookahead_dist.errors import MixingError

DEFAULT_TOL = 1e-9
#: The most agents a dense n x n matrix (``Phase.matrix``, ``Schedule.matrix``, ``period_product``) may have:
#: 128 MiB of float64 at 4096. Larger phases are used through their sparse form (``Phase.csc``, ``column``, ``row``).
MAX_DENSE_AGENTS = 4096
#: Up to this many agents (the former limit of every topology), the fingerprint hashes the dense bytes.
DENSE_FINGERPRINT_AGENTS = 2048
#: The most stored entries a sparse form may have (an averaging block of b agents stores b entries per column):
#: 2^26 entries are 800 MB as a sparse matrix.
MAX_NONZEROS = 2**26

__all__ = [
    "DEFAULT_TOL",
    "DENSE_FINGERPRINT_AGENTS",
    "MAX_DENSE_AGENTS",
    "MAX_NONZEROS",
    "Averaging",
    "Phase",
    "as_matrix",
    "check_column_stochastic",
    "check_phase",
    "check_row_stochastic",
    "circulant_spectrum",
    "is_column_stochastic",
    "is_row_stochastic",
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
