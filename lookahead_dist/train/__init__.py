"""The torchrun application behind ``launch/train.py``: typed run configs, data, models and the
training loop with checkpoints, a run directory and a consensus model.

Nothing in the core imports this package.
"""
