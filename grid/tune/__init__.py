"""Tuning as a thin layer on the grid engine: a tune spec is a grid spec plus a ``tune:`` block.

- ``space``: the ``tune:`` block's model and the search space (Optuna distributions).
- ``study``: storage, sampler, opening a study, resuming a dead driver's trials.
- ``choose``: confidence intervals of validation metrics and the choice of the best trial.
- ``driver``: Optuna ask/tell over the grid's plan, stages and store (``grid.run.Runner``).
- ``legacy``: the pre-0.2 tune format, refused with the equivalent new spec.
"""
