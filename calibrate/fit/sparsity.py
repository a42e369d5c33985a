"""Sparsity in the user's terms: a target share of open gates per column group.

A raw L0 penalty lambda has no fixed meaning: its effect depends on the loss scale, the
problem size and on Adam's normalisation, which weighs it against each column's data
gradient in absolute units (and against Adam's epsilon). So when a target share is set,
the L0 term acts *decoupled* from Adam, as AdamW decouples weight decay: after each Adam
step every gate's log_alpha moves down by ``lr * p_g * s_j``, where ``p_g`` is the pressure
of its column group (one CD's block of households, in the calibration) and ``s_j`` a fixed
per-column speed drawn uniformly from SPEED_RANGE. A gate whose data gradient consistently
asks to stay open (Adam's normalised step, up to ``lr``, beats the pressure) stays open;
gates that only see noise drift shut. The speeds spread those otherwise identical gates'
closing over time, so the share falls smoothly instead of all at once.

The pressure is set every epoch by a proportional controller from the gap between the
group's share of open deterministic gates and a schedule that falls from 1 to the target
share over the ramp (a cubic ramp, as in gradual magnitude pruning, Zhu & Gupta 2017):

    p_g = clip(gain * e_g, -0.5, 1),  e_g the relative share error outside a small dead band

A group below its schedule gets a negative pressure, which lets recently closed gates
reopen (a closed hard-concrete gate gets no data gradient to reopen it), so an overshoot
corrects itself; the dead band just below the target leaves gates alone once the share
is met, and the share ends at or just below the target. The pressure is in units of the
learning rate, the same whatever the loss scale, so the user names only the share.
log_alpha is kept above LOG_ALPHA_FLOOR. Group sums use a dense gather of each group's
columns (no scatter-add), so results are bitwise reproducible on GPUs too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from calibrate.fit.model import GateShape, Layout, deterministic_gates

PRESSURE_RANGE = (-0.5, 1.0)  # controller output, in units of the learning rate per epoch
LOG_ALPHA_FLOOR = -10.0  # closed gates are held above this (P(open) ~ 1e-4)
SPEED_RANGE = (0.2, 1.8)  # per-column pressure multipliers: spread the closing wave over time


class SparsitySchedule(NamedTuple):
    """Static settings of the controller (``target_share`` <= 0: fixed lambda, no control)."""

    target_share: float  # final share of open gates per group, in (0, 1]
    ramp_epochs: int  # epochs over which the scheduled share falls from 1 to target_share
    gain: float  # pressure for a 100% relative share error
    polish_start: int  # from this epoch on: deterministic gates, gates and lambdas frozen


class GroupIndex(NamedTuple):
    """Column groups on the device: ids of active/inactive columns and a dense member table."""

    active: jax.Array  # int32 group id of each active column (layout order)
    inactive: jax.Array  # int32 group id of each inactive column
    members: jax.Array  # (n_groups, largest group) positions in [active, inactive]; padding = n_columns
    sizes: jax.Array  # float32 number of columns of each group
    speed_active: jax.Array  # float32 pressure multiplier of each active column
    speed_inactive: jax.Array  # float32 pressure multiplier of each inactive column


class BlockGroups(NamedTuple):
    """Column groups of the dense-block layout (:mod:`calibrate.fit.blocks`): columns group-major, every
    group padded to one width, so a group is a row of the (groups, width) reshape (no gather)."""

    sizes: jax.Array  # float32 number of real columns of each group
    speed_active: jax.Array  # float32 pressure multiplier of each column (0 on padding)
    speed_inactive: jax.Array  # empty: the layout has no inactive part


def block_groups(layout, codes: np.ndarray, seed: int = 0) -> dict:
    """Host arrays of :class:`BlockGroups` for a :class:`calibrate.fit.blocks.BlockLayout` (its ``split``
    puts a column vector in the padded order); speeds as :func:`build_group_index` draws them."""
    return {"sizes": np.bincount(codes, minlength=layout.n_groups).astype(np.float32),
            "speed_active": layout.fill(speed_chunks(layout.n_columns, seed, layout.chunk_size()), 0.0, np.float32),
            "speed_inactive": np.zeros(0, np.float32)}


def per_column(lambdas: jax.Array, groups: GroupIndex | BlockGroups) -> tuple[jax.Array, jax.Array]:
    """Each column's value of a per-group quantity: (active part, inactive part); padding gets 0."""
    if isinstance(groups, BlockGroups):
        real = (groups.speed_active > 0).astype(lambdas.dtype).reshape(lambdas.shape[0], -1)  # 0 on padding
        return (lambdas[:, None] * real).reshape(-1), jnp.zeros(0, lambdas.dtype)
    return lambdas[groups.active], lambdas[groups.inactive]


def schedule_of(cfg, share: float | None = None) -> SparsitySchedule:
    """The controller's static settings of a ``FitConfig`` for a target ``share`` (None: off, -1).

    ``ramp_epochs = round(sparsity.ramp * (epochs - polish_epochs))`` (at least 1) and
    ``polish_start = epochs - polish_epochs`` both move with ``epochs``: they are part of what a
    checkpoint is (:func:`calibrate.fit.checkpoint.path_schedule`).
    """
    target = -1.0 if share is None else float(share)
    ramp = max(1, round(cfg.sparsity.ramp * (cfg.epochs - cfg.polish_epochs)))
    return SparsitySchedule(target, ramp, float(cfg.sparsity.gain), int(cfg.epochs - cfg.polish_epochs))


def build_group_index(layout: Layout, column_groups: np.ndarray | None, seed: int = 0) -> dict:
    """Host arrays of a :class:`GroupIndex` (one group when ``column_groups`` is None).

    Column speeds are uniform in SPEED_RANGE, drawn in original column order from ``seed``.
    """
    if column_groups is None:
        column_groups = np.zeros(layout.n_columns, dtype=np.int64)
    codes = group_codes(np.asarray(column_groups))
    joined = np.concatenate([codes[layout.active_ids], codes[layout.inactive_ids]])
    members, counts = group_members(joined)
    speed = column_speeds(layout.n_columns, seed)
    return {
        "active": codes[layout.active_ids], "inactive": codes[layout.inactive_ids], "members": members,
        "sizes": counts.astype(np.float32), "speed_active": speed[layout.active_ids],
        "speed_inactive": speed[layout.inactive_ids],
    }


def group_members(joined: np.ndarray, n_groups: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(members, counts): each group's positions in ``joined`` (group codes of [active, inactive])
    in a dense (groups, largest group) table padded with ``joined.size``, and each group's size."""
    # a stable sort of 16-bit keys is a radix sort (same order as on int32, a fraction of the time)
    order = np.argsort(joined.astype(np.int16) if joined.max(initial=0) < 2**15 else joined, kind="stable")
    counts = np.bincount(joined, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    members = np.full((counts.size, int(counts.max(initial=0))), joined.size, dtype=np.int32)
    sorted_codes = joined[order]
    members[sorted_codes, np.arange(joined.size) - starts[sorted_codes]] = order
    return members, counts


def column_speeds(n_columns: int, seed: int) -> np.ndarray:
    """Each column's pressure multiplier, uniform in SPEED_RANGE, in original column order from ``seed``."""
    return next(speed_chunks(n_columns, seed, max(n_columns, 1)), np.zeros(0)).astype(np.float32)  # one chunk


def speed_chunks(n_columns: int, seed: int, size: int) -> Iterator[np.ndarray]:
    """:func:`column_speeds` before the cast to float32, in consecutive chunks of ``size`` columns
    (``Generator.uniform``'s values, computed in place: low + (high - low) * U[0, 1)); each chunk is a view
    of one buffer the next overwrites, so copy it before advancing."""
    low, high = SPEED_RANGE
    rng = np.random.default_rng([seed, 0x5EED])
    speeds = np.empty(min(size, n_columns))
    for a in range(0, n_columns, size):
        k = min(size, n_columns - a)
        rng.random(out=speeds[:k])
        speeds[:k] *= high - low
        speeds[:k] += low
        yield speeds[:k]


def group_codes(groups: np.ndarray) -> np.ndarray:
    """``np.unique(groups, return_inverse=True)[1]`` as int32; integer ids of a small range in one pass."""
    if groups.dtype == np.int32 and groups.size and int(groups.min()) == 0 and \
            np.bincount(groups, minlength=int(groups.max()) + 1).all():
        return groups  # already codes 0..G-1, every one present (the stacked layout's CD index)
    if groups.dtype.kind in "iu" and groups.size and int(groups.max()) - int(groups.min()) <= 4 * groups.size:
        offset = groups.astype(np.int64) - int(groups.min())
        present = np.zeros(int(offset.max()) + 1, dtype=bool)
        present[offset] = True
        return (np.cumsum(present) - 1).astype(np.int32)[offset]
    return np.unique(groups, return_inverse=True)[1].astype(np.int32)


def scheduled_share(epoch: jax.Array, schedule: SparsitySchedule) -> jax.Array:
    """Target open share at ``epoch``: target + (1 - target) * (1 - t/ramp)^3, then target."""
    progress = jnp.minimum(epoch.astype(jnp.float32) / max(schedule.ramp_epochs, 1), 1.0)
    return schedule.target_share + (1.0 - schedule.target_share) * (1.0 - progress) ** 3


def group_open_shares(active_alpha: jax.Array, inactive_alpha: jax.Array, groups: GroupIndex | BlockGroups,
                      shape: GateShape) -> jax.Array:
    """Share of open deterministic gates (gate > 0) per group."""
    if isinstance(groups, BlockGroups):
        is_open = (deterministic_gates(active_alpha, shape) > 0).astype(jnp.float32)
        return jnp.sum(is_open.reshape(groups.sizes.shape[0], -1), axis=1) / groups.sizes
    is_open = jnp.concatenate([deterministic_gates(active_alpha, shape) > 0,
                               deterministic_gates(inactive_alpha, shape) > 0,
                               jnp.zeros(1, bool)]).astype(jnp.float32)
    per_group = is_open[groups.members]
    sums = jnp.dot(per_group, jnp.ones(per_group.shape[1], per_group.dtype), precision=jax.lax.Precision.HIGHEST)
    return sums / groups.sizes


DEADBAND = (0.03, 0.01)  # shares between target * (1 - 0.03) and target * (1 - 0.01) get no pressure


def controller_pressure(shares: jax.Array, target: jax.Array, gain: float) -> jax.Array:
    """clip(gain * e, PRESSURE_RANGE) per group, e the relative share error outside the band
    [target * (1 - DEADBAND[0]), target * (1 - DEADBAND[1])]: inside it no gate is pushed (fewer
    gates hover at the boundary, less gate noise), so the share ends at or just below the target."""
    error = (shares - target) / target
    error = jnp.maximum(error + DEADBAND[1], 0.0) + jnp.minimum(error + DEADBAND[0], 0.0)
    return jnp.clip(gain * error, *PRESSURE_RANGE)


def apply_pressure(log_alpha: jax.Array, pressure: jax.Array, lr: float) -> jax.Array:
    """log_alpha - lr * pressure (per column), kept above LOG_ALPHA_FLOOR."""
    return jnp.maximum(log_alpha - lr * pressure, LOG_ALPHA_FLOOR)
