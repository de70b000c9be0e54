"""Models trained elsewhere, in and out of bdgrid.

- ``backdoorbench``: read a BackdoorBench attack record (``record/<name>/attack_result.pt`` and
  the images under ``bd_test_dataset/``) as a backdoored model with its own backdoor test set;
  write bdgrid's models back in that layout (``attack_result.pt``, ``defense_result.pt``).
- ``checkpoints``: a plain ``state_dict`` trained anywhere, for a bdgrid architecture.
- ``names``: BackdoorBench's model, dataset and attack names and what they are in bdgrid.
- ``safe_load``: ``torch.load(weights_only=True)`` with the few numpy types these files need.

Every user mistake (a missing file, an unknown model name, a pickle that wants to run code)
is a ``RecordProblem`` with one message naming the file and the value.
"""
from defense.external.safe_load import RecordProblem  # noqa: F401

__all__ = ["RecordProblem"]
