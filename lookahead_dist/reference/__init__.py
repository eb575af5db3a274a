"""The float64 oracle: the reference engine, its test problems and the paper's bounds.

* :mod:`~lookahead_dist.reference.simulate`: n agents on a schedule in one process, in float64
  (:class:`~lookahead_dist.reference.simulate.Reference`), the engine every distributed run is
  checked against;
* :mod:`~lookahead_dist.reference.problems`: deterministic problems and data streams keyed by
  (seed, tag, agent, step), so that spawned ranks reproduce the reference exactly;
* :mod:`~lookahead_dist.reference.theory`: the step-size condition (13), the bound (14) and (15)
  of Theorem 2, and the recommended alpha.

Nothing in the core imports this package.
"""
