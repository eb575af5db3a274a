"""Argument checks shared by the optimizer wrappers, the mixing algebra and the reference.

Each check returns the value in its canonical type (``int`` or ``float``) or
raises an error that names the argument, the rule and the bad value::

    SlowMo: alpha must lie in (0, 1], got 1.5 (pass max_alpha to allow ...)

The error class is :class:`~lookahead_dist.errors.ConfigError` unless the
caller passes another one of the library's (``error=MixingError`` for the
matrix algebra). The raised error carries ``argument``, ``rule`` and ``value``
attributes, so that a caller with its own message format (a YAML key path)
can reuse the rule.

Which range for which alpha
---------------------------
The letter alpha names three different things in this library, and each has
the range its meaning allows:

* **The mixing weight of a Lookahead matrix** (:func:`check_mixing_alpha`:
  ``mixing.lookahead_matrix``, ``lookahead_schedule``, the ``two_agent``
  generator): alpha in **[0, 1]**. P = a 1^T with a = [alpha, 1 - alpha] is
  non-negative and column-stochastic exactly for these values. alpha = 0 is
  degenerate but a valid matrix (its only edge is slow -> fast: the fast agent
  is reset to z and z never moves), and alpha = 1 is the single edge
  fast -> slow; both have consensus rate 0. A matrix is data, so a valid
  matrix is accepted even when it makes a useless optimizer.
* **Lookahead's slow step size** (:func:`check_lookahead_alpha`: ``Lookahead``,
  the bounds of Theorem 2 in ``reference.theory``): alpha in **(0, 1]**.
  z <- z + alpha (x - z) with alpha = 0 never moves the slow weights, so the
  optimizer would silently never learn, and the theory divides by alpha
  (the effective step is alpha gamma). alpha > 1 extrapolates past the fast
  weights: the sync is then no longer a convex combination (no mixing
  matrix), and the paper's analysis assumes alpha <= 1.
* **SlowMo's slow learning rate** (:func:`check_slow_alpha`: ``SlowMo``, the
  reference's ``SlowMomentum``): alpha in **(0, max_alpha]**, max_alpha = 1
  by default. It is a learning rate (z <- z - alpha gamma u), so 0 is refused
  as for Lookahead. Values above 1 are legitimate for slow momentum (the
  SlowMo paper tunes alpha together with beta), but with beta = 0 they turn
  the slow step into the matrix step with the negative weight 1 - alpha, which
  is no longer a mixing matrix and no longer Lookahead; so they are accepted
  only on request (``max_alpha``). The reference engine takes the same
  ``max_alpha`` so that such a run can still be checked against it.

beta (slow momentum) lies in **[0, 1)**: beta = 1 never forgets and the
momentum grows without bound. tau (steps per period) is an integer >= 1 (a
``bool`` is not an integer here). The base optimizer's state at a slow step
follows one of :data:`OPTIMIZER_STATE_POLICIES`.
"""

from __future__ import annotations

import math
import numbers
import reprlib
from typing import Any, Callable, Sequence

from lookahead_dist.errors import ConfigError

__all__ = [
    "OPTIMIZER_STATE_POLICIES",
    "check_beta",
    "check_choice",
    "check_fragments",
    "check_int",
    "check_lookahead_alpha",
    "check_mixing_alpha",
    "check_optimizer_state",
    "check_real",
    "check_slow_alpha",
    "check_tau",
]

#: What happens to the base optimizer's state at a slow step: kept, cleared, or averaged over the workers.
OPTIMIZER_STATE_POLICIES = ("keep", "reset", "average")

ErrorType = Callable[[str], Exception]


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict = 3, 10, 10, 6
_SHORT.maxstring, _SHORT.maxlong, _SHORT.maxother = 60, 40, 60


def short_repr(value) -> str:
    """repr(value) cut to about a line: error messages quote bad input, which may be huge or deeply nested."""
    return _SHORT.repr(value)


def _fail(error: ErrorType, name: str, rule: str, value: Any, hint: str = "") -> Exception:
    exc = error(f"{name} must {rule}, got {short_repr(value)}{hint}")
    exc.argument, exc.rule, exc.value = name, f"must {rule}", value
    return exc


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float64's range
        return False


def check_int(value, name: str, *, low: int = 1, error: ErrorType = ConfigError) -> int:
    """An integer (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise _fail(error, name, f"be an integer >= {low}", value)
    return int(value)


def check_real(
    value, name: str, rule: str, ok: Callable[[float], bool], *, error: ErrorType = ConfigError, hint: str = ""
) -> float:
    """A finite real number (not a bool) for which ``ok`` holds; ``rule`` says in words what ``ok`` checks."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not _finite(value) or not ok(float(value)):
        raise _fail(error, name, rule, value, hint)
    return float(value)


def check_tau(value, name: str = "tau", *, error: ErrorType = ConfigError) -> int:
    """Steps per period: an integer >= 1."""
    return check_int(value, name, low=1, error=error)


def check_mixing_alpha(value, name: str = "alpha", *, error: ErrorType = ConfigError) -> float:
    """The weight of the fast agent in a Lookahead matrix a 1^T, a = [alpha, 1 - alpha]: [0, 1]."""
    return check_real(value, name, "lie in [0, 1]", lambda v: 0.0 <= v <= 1.0, error=error)


def check_lookahead_alpha(value, name: str = "alpha", *, error: ErrorType = ConfigError) -> float:
    """Lookahead's slow step size, z <- z + alpha (x - z): (0, 1]."""
    return check_real(value, name, "lie in (0, 1]", lambda v: 0.0 < v <= 1.0, error=error)


def check_slow_alpha(value, name: str = "alpha", *, max_alpha: float = 1.0, error: ErrorType = ConfigError) -> float:
    """SlowMo's slow learning rate, z <- z - alpha gamma u: (0, max_alpha]."""
    check_real(max_alpha, "max_alpha", "be a real number > 0", lambda v: v > 0.0, error=error)
    hint = "" if max_alpha > 1 else " (pass max_alpha to allow a larger slow learning rate on purpose)"
    return check_real(value, name, f"lie in (0, {max_alpha:g}]", lambda v: 0.0 < v <= max_alpha, error=error, hint=hint)


def check_beta(value, name: str = "beta", *, error: ErrorType = ConfigError) -> float:
    """Slow momentum: [0, 1)."""
    return check_real(value, name, "lie in [0, 1)", lambda v: 0.0 <= v < 1.0, error=error)


def check_fragments(value, tau: int, name: str = "fragments", *, error: ErrorType = ConfigError) -> int:
    """Streaming fragments of a slow step: an integer in [1, tau] (at most one fragment syncs per step)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= tau:
        raise _fail(error, name, f"be an integer in [1, tau] = [1, {tau}]", value)
    return int(value)


def check_choice(value, name: str, choices: Sequence, *, error: ErrorType = ConfigError):
    """One of ``choices`` (compared with ==; unhashable values are refused, not raised on)."""
    try:
        ok = value in choices
    except TypeError:
        ok = False
    if not ok:
        raise _fail(error, name, f"be one of {tuple(choices)}", value)
    return value


def check_optimizer_state(value, name: str = "optimizer_state", *, error: ErrorType = ConfigError) -> str:
    """The base optimizer's state policy at a slow step: one of :data:`OPTIMIZER_STATE_POLICIES`."""
    return check_choice(value, name, OPTIMIZER_STATE_POLICIES, error=error)
