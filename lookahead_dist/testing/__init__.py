"""Helpers for tests and for ``python -m lookahead_dist.verify``: spawning rank groups and the
code those ranks run.

* :mod:`~lookahead_dist.testing.spawn`: start n gloo ranks from a forkserver and collect results;
* :mod:`~lookahead_dist.testing.verify`: one topology trained on spawned ranks against the reference;
* :mod:`~lookahead_dist.testing.workers`: rank functions that the test suite spawns;
* :mod:`~lookahead_dist.testing.local_placement`: every agent on one rank (the engine's local path),
  shared by the CPU and the GPU tests.
"""
