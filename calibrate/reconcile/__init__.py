"""Stage between matrix and fit: decide which value each target is fitted to and how it enters the loss.

Takes the built matrix and the ``reconcile`` (and ``holdout``) settings; gives a
:class:`ReconciledTargets`: the values to fit, per-target loss weights and tolerances, the
plan (status and reason of every target, shown in ``targets.csv``) and the analysis table
``consistency.csv``. ``consistency`` checks hierarchies and support, ``feasibility`` solves
each area's joint feasibility, ``reconcile`` applies scale rules and exclusions, ``loss``
balances the loss across geographic levels, ``holdout`` splits targets into a training set
(fitted) and a holdout set (loss weight 0, scored after the fit).
"""

from calibrate.reconcile.config import ReconcileConfig, ReconcileError, ScaleRule
from calibrate.reconcile.consistency import template_key
from calibrate.reconcile.holdout import HOLDOUT, TRAIN, HoldoutError, HoldoutSpec, split_targets
from calibrate.reconcile.loss import loss_weights
from calibrate.reconcile.reconcile import TargetPlan
from calibrate.reconcile.stage import ReconciledTargets, reconcile_targets

__all__ = [
    "HOLDOUT", "TRAIN", "HoldoutError", "HoldoutSpec", "ReconcileConfig", "ReconcileError", "ReconciledTargets",
    "ScaleRule", "TargetPlan", "loss_weights", "reconcile_targets", "split_targets", "template_key",
]
