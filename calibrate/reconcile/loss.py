"""Per-target loss weights: every geographic level, and every group inside it, gets a fair share.

With ``balance="level"`` each level present (national, state, district) gets 1/L of the
loss; inside a level each group (stratum group x variable: e.g. district age bins,
district SNAP households, state Medicaid enrolment) gets an equal part of the level's
share; inside a group every target counts the same. So 8,000 district age bins cannot
drown the 50 state SNAP targets, and a handful of national totals cannot take the whole
gradient either (the old per-variable balance gave each national total as much weight as
all district age bins together). ``"group"`` is that old balance (each variable x level
group 1/G), ``"none"`` weights every target equally. ``"precision"`` weights each target by
the inverse of its squared relative standard error: the published margin of error over
the z of its confidence level (1.645 at 90 %) over |value|, at least ``min_relative_se``;
``default_relative_se`` where no margin is published (administrative totals). A district
age bin known to +-7 % then counts less than a state total known to +-2 %, and a squared
relative error weighted so is the chi-square of the estimate against its sampling error. Excluded and held-out targets get
weight 0, down-weighted ones their multiplier; the weights sum to 1.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from calibrate.core.errors import CalibrateError
from calibrate.targets.margins import relative_standard_errors

BALANCES = ("precision", "level", "group", "none")


def loss_weights(targets: pd.DataFrame, balance: str = "level", in_loss: np.ndarray | None = None,
                 multiplier: np.ndarray | None = None, default_relative_se: float = 0.02,
                 min_relative_se: float = 0.002) -> np.ndarray:
    """Weights summing to 1 over the targets in the loss (``in_loss``), shares as described above."""
    if balance not in BALANCES:
        raise CalibrateError(f"reconcile.balance={balance!r}: choose one of {', '.join(BALANCES)}")
    n = len(targets)
    in_loss = np.ones(n, dtype=bool) if in_loss is None else np.asarray(in_loss, dtype=bool)
    if not in_loss.any():
        raise CalibrateError("no target is left in the loss (all excluded or held out)")
    level = targets.geo_level.to_numpy()
    group = (targets.stratum_group_id.astype(str) + "|" + targets.variable).to_numpy()
    w = np.zeros(n)
    if balance == "none":
        w[in_loss] = 1.0
    elif balance == "precision":
        rel = relative_standard_errors(targets, default_relative_se, min_relative_se)
        w[in_loss] = 1.0 / np.square(rel[in_loss])
    elif balance == "group":
        keys = pd.Series(level + "|" + targets.variable.to_numpy())[in_loss]
        w[in_loss] = 1.0 / keys.map(keys.value_counts()).to_numpy()
    else:
        frame = pd.DataFrame({"level": level, "group": group})[in_loss]
        n_levels = frame.level.nunique()
        groups_per_level = frame.groupby("level").group.nunique()
        size = frame.groupby(["level", "group"]).group.transform("size")
        w[in_loss] = 1.0 / (n_levels * frame.level.map(groups_per_level).to_numpy() * size.to_numpy())
    if multiplier is not None:
        w = w * np.asarray(multiplier, dtype=np.float64)
    return w / w.sum()
