"""bdgrid's trial layer: data, attacks, models, training, defenses and metrics in plain torch.

Nothing here imports ray or optuna: a trial is a function call that a notebook, a test or a
Ray worker makes alike (see ``defense.trial``).
"""
