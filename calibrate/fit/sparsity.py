"""Sparsity in the user's terms: a target share of open gates per column group.

A raw L0 penalty lambda has no fixed meaning (its effect depends on the loss scale,
the problem size and Adam's normalisation), so the fit can instead steer lambda. Each
column group (in the calibration, one CD's block of households) has its own lambda,
set every epoch by a proportional controller from the gap between the group's share of
open gates and a schedule that falls from 1 to the target share (a cubic ramp, as in
gradual magnitude pruning, Zhu & Gupta 2017):

    lambda_g = scale * clip(gain * (share_g - scheduled) / scheduled, -1, 10)

A group above its schedule gets a positive L0 weight (gates close, the least useful
first: the data loss holds the useful ones open); a group below it gets a small negative
one, which lets recently closed gates reopen, so an overshoot corrects itself instead of
being absorbed (a closed hard-concrete gate gets no data gradient). ``scale`` is set by
the fit from the problem (initial data loss per column), so the user only names the
share. The share counted is that of deterministic gates (the gates the final weights
use). Group sums use a dense gather of each group's columns (no scatter-add), so results
are bitwise reproducible on GPUs too.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from calibrate.fit.model import GateShape, Layout, deterministic_gates

LAMBDA_RANGE = (-1.0, 10.0)  # lambda_g / scale is clipped to this range


class SparsitySchedule(NamedTuple):
    """Static settings of the controller (``target_share`` <= 0: fixed lambda, no control)."""

    target_share: float  # final share of open gates per group, in (0, 1]
    ramp_epochs: int  # epochs over which the scheduled share falls from 1 to target_share
    gain: float  # lambda / scale for a 100% relative share error
    polish_start: int  # from this epoch on: deterministic gates, gates and lambdas frozen


class GroupIndex(NamedTuple):
    """Column groups on the device: ids of active/inactive columns and a dense member table."""

    active: jax.Array  # int32 group id of each active column (layout order)
    inactive: jax.Array  # int32 group id of each inactive column
    members: jax.Array  # (n_groups, largest group) positions in [active, inactive]; padding = n_columns
    sizes: jax.Array  # float32 number of columns of each group


def build_group_index(layout: Layout, column_groups: np.ndarray | None) -> dict:
    """Host arrays of a :class:`GroupIndex` (one group when ``column_groups`` is None)."""
    if column_groups is None:
        column_groups = np.zeros(layout.n_columns, dtype=np.int64)
    codes = np.unique(np.asarray(column_groups), return_inverse=True)[1].astype(np.int32)
    joined = np.concatenate([codes[layout.active_ids], codes[layout.inactive_ids]])
    order = np.argsort(joined, kind="stable")
    counts = np.bincount(joined)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    members = np.full((counts.size, int(counts.max())), joined.size, dtype=np.int32)
    sorted_codes = joined[order]
    members[sorted_codes, np.arange(joined.size) - starts[sorted_codes]] = order
    return {
        "active": codes[layout.active_ids], "inactive": codes[layout.inactive_ids], "members": members,
        "sizes": counts.astype(np.float32),
    }


def scheduled_share(epoch: jax.Array, schedule: SparsitySchedule) -> jax.Array:
    """Target open share at ``epoch``: target + (1 - target) * (1 - t/ramp)^3, then target."""
    progress = jnp.minimum(epoch.astype(jnp.float32) / max(schedule.ramp_epochs, 1), 1.0)
    return schedule.target_share + (1.0 - schedule.target_share) * (1.0 - progress) ** 3


def group_open_shares(active_alpha: jax.Array, inactive_alpha: jax.Array, groups: GroupIndex,
                      shape: GateShape) -> jax.Array:
    """Share of open deterministic gates (gate > 0) per group."""
    is_open = jnp.concatenate([deterministic_gates(active_alpha, shape) > 0,
                               deterministic_gates(inactive_alpha, shape) > 0,
                               jnp.zeros(1, bool)]).astype(jnp.float32)
    per_group = is_open[groups.members]
    sums = jnp.dot(per_group, jnp.ones(per_group.shape[1], per_group.dtype), precision=jax.lax.Precision.HIGHEST)
    return sums / groups.sizes


def controlled_lambdas(shares: jax.Array, target: jax.Array, gain: float, scale: jax.Array) -> jax.Array:
    """scale * clip(gain * (share - target) / target, LAMBDA_RANGE)."""
    return scale * jnp.clip(gain * (shares - target) / target, *LAMBDA_RANGE)
