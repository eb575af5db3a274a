"""The torchrun application behind ``launch/train.py``.

:mod:`~lookahead_dist.train.config` (typed run configs from YAML),
:mod:`~lookahead_dist.train.data` (sharded, deterministic batches),
:mod:`~lookahead_dist.train.models`, :mod:`~lookahead_dist.train.schedules`
(the learning rate), :mod:`~lookahead_dist.train.step` (one training step),
:mod:`~lookahead_dist.train.consensus` (the evaluated average model),
:mod:`~lookahead_dist.train.checkpoint` (per-rank checkpoints, manifest, resume),
:mod:`~lookahead_dist.train.rundir` (the run directory) and
:mod:`~lookahead_dist.train.trainer` (build, then the loop: ``train(cfg)``).

Nothing in the core imports this package.
"""
