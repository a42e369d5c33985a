"""Stage between matrix and fit: decide how each target enters the loss.

``holdout`` splits the targets into a training set (fitted) and a holdout set (left out
of the loss with weight 0, estimated and scored after the fit).
"""

from calibrate.reconcile.holdout import HOLDOUT, TRAIN, HoldoutError, HoldoutSpec, apply_holdout, split_targets

__all__ = ["HOLDOUT", "TRAIN", "HoldoutError", "HoldoutSpec", "apply_holdout", "split_targets"]
