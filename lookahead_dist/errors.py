"""One exception family for the whole library.

Every error that bad input can cause derives from :class:`LookaheadDistError`.
The ones caused by a bad argument or file are also ``ValueError``\\s, so code
that already catches ``ValueError`` keeps working.
"""


class LookaheadDistError(Exception):
    """Base class of every error raised by lookahead_dist."""


class MixingError(LookaheadDistError, ValueError):
    """A matrix or schedule is not a valid mixing matrix (shape, sign, sums)."""


class TopologyError(LookaheadDistError, ValueError):
    """A topology (YAML file, mapping or generator call) is invalid.

    The message names the file, the key path inside it and the offending value.
    """


class ConfigError(LookaheadDistError, ValueError):
    """A run configuration or an optimizer argument is invalid."""


class CheckpointError(ConfigError):
    """A checkpoint cannot be resumed: the message names the file and what is wrong with it."""


class CommError(LookaheadDistError, RuntimeError):
    """Communication between ranks failed: a mismatch between ranks, a lost peer, a timeout."""


class MembershipError(CommError):
    """Elastic members could not agree on a next generation, or this worker was left out of it."""


class InFlightError(LookaheadDistError, RuntimeError):
    """A tensor that overlapped communication was still reading or writing was changed in place."""


class DivergenceError(LookaheadDistError, FloatingPointError):
    """A loss or parameter became NaN or infinite."""
