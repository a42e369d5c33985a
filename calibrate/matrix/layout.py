"""The geometry of the geo-stacked columns, in one place (:class:`StackedLayout`).

Column ``cd_idx * n_households + hh_idx`` is household ``hh_idx`` placed in CD
``cds[cd_idx]`` (CD-major). Everything that maps columns to (CD, household), CDs to
their states, or spreads household weights over the CDs goes through this module, so the
formula lives here only (tests/test_architecture.py greps the tree for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from calibrate.targets.geography import state_of_cd


@dataclass(frozen=True, eq=False)
class StackedLayout:
    """CDs, their states, the households and the column <-> (CD, household) map."""

    cds: tuple[int, ...]
    household_ids: np.ndarray
    household_weights: np.ndarray  # base weights
    household_states: np.ndarray  # home state FIPS of each household

    @classmethod
    def of(cls, cds, household_ids, household_weights=None, household_states=None) -> StackedLayout:
        """A layout from plain sequences (weights default to 1, states to 0: geometry only)."""
        ids = np.asarray(household_ids, dtype=np.int64)
        weights = np.ones(ids.size) if household_weights is None else np.asarray(household_weights, np.float64)
        states = np.zeros(ids.size, np.int64) if household_states is None else np.asarray(household_states, np.int64)
        return cls(tuple(int(c) for c in cds), ids, weights, states)

    @property
    def n_households(self) -> int:
        return len(self.household_ids)

    @property
    def n_cds(self) -> int:
        return len(self.cds)

    @property
    def n_columns(self) -> int:
        return self.n_cds * self.n_households

    @cached_property
    def cd_states(self) -> np.ndarray:
        """State FIPS of each CD, in CD order."""
        return np.array([state_of_cd(c) for c in self.cds], dtype=np.int64)

    @cached_property
    def states(self) -> tuple[int, ...]:
        """The distinct states of the CDs, sorted."""
        return tuple(int(s) for s in np.unique(self.cd_states))

    def cd_index(self, cd: int) -> int:
        return self.cds.index(int(cd))

    def block_start(self, cd_index):
        """First column of CD ``cd_index``'s block (vectorised)."""
        return np.asarray(cd_index, dtype=np.int64) * self.n_households

    def column(self, cd_index, household_index):
        """Column of household ``household_index`` placed in CD ``cd_index`` (vectorised)."""
        return self.block_start(cd_index) + np.asarray(household_index, dtype=np.int64)

    def split(self, columns) -> tuple[np.ndarray, np.ndarray]:
        """(CD index, household index) of each column."""
        return np.divmod(np.asarray(columns, dtype=np.int64), self.n_households)

    def household_of(self, columns) -> np.ndarray:
        """Household index of each column (the same household in every CD block)."""
        return np.asarray(columns, dtype=np.int64) % max(self.n_households, 1)

    def column_groups(self) -> np.ndarray:
        """CD index of every column: the fit's sparsity groups (a target share is met in every CD)."""
        return np.repeat(np.arange(self.n_cds, dtype=np.int32), self.n_households)

    def per_cd(self, weights) -> np.ndarray:
        """Stacked weights as an (n_cds, n_households) view, one row per CD."""
        weights = np.asarray(weights)
        if weights.shape != (self.n_columns,):
            raise ValueError(f"weights have shape {weights.shape}, expected ({self.n_columns},) = "
                             f"{self.n_cds} CDs x {self.n_households} households")
        return weights.reshape(self.n_cds, self.n_households)

    def active_per_cd(self, weights) -> dict[str, float]:
        """Households with a nonzero weight in each CD: min, median, max (and the share of the median)."""
        counts = np.count_nonzero(self.per_cd(weights), axis=1)
        return {"min": int(counts.min()), "median": float(np.median(counts)), "max": int(counts.max()),
                "median_share": float(np.median(counts) / self.n_households)}

    def home_state_columns(self, state: int | None = None) -> np.ndarray:
        """Per household: its column in the first CD of ``state`` (every household placed there), or,
        with ``state=None``, in the first CD of its own state; -1 where that state has no CD."""
        first = {s: int(np.flatnonzero(self.cd_states == s)[0]) for s in self.states}
        hh = np.arange(self.n_households)
        if state is not None:
            return self.column(first[int(state)], hh) if int(state) in first else np.full(self.n_households, -1)
        blocks = np.array([first.get(int(s), -1) for s in self.household_states], dtype=np.int64)
        return np.where(blocks >= 0, self.column(blocks, hh), -1)

    def _checked_base_weights(self) -> np.ndarray:
        """The base weights as float64, refused unless finite, > 0 and one per household, with a CD to place them."""
        base = np.asarray(self.household_weights, dtype=np.float64)
        hh_state = np.asarray(self.household_states)
        if base.ndim != 1 or hh_state.shape != base.shape:
            raise ValueError(f"household_weights {base.shape} and household_states {hh_state.shape} must be equal "
                             "1-D shapes")
        bad = np.flatnonzero(~np.isfinite(base) | (base <= 0))
        if bad.size:
            raise ValueError(f"household_weights must be finite and > 0; bad indices {bad[:10].tolist()}")
        if self.n_cds == 0:
            raise ValueError("the layout has no CD")
        return base

    def initial_weights(self, home_state_share: float | None = 0.9) -> np.ndarray:
        """Starting weights of the fit: each household's base weight split, ``home_state_share``
        evenly over the CDs of its own state, the rest evenly over all other CDs (all of it evenly
        over all CDs when its state has none in the list; all on the home CDs when no other CD
        exists); ``None``: evenly over all CDs (population-proportional). Column totals per household
        equal its base weight and every weight is > 0, as the fit's log parametrisation needs."""
        base = self._checked_base_weights()
        hh_state = np.asarray(self.household_states)
        if home_state_share is None:
            return np.tile(base / self.n_cds, self.n_cds)
        if not 0 < home_state_share < 1:
            raise ValueError(f"home_state_share={home_state_share!r} must be in (0, 1)")
        in_home = self.cd_states[:, None] == hh_state[None, :]  # (n_cds, n_households)
        n_home = in_home.sum(axis=0)
        n_other = self.n_cds - n_home
        home_share = np.where(n_home == 0, 0.0, np.where(n_other == 0, 1.0, home_state_share))
        per_home = np.divide(home_share, n_home, out=np.zeros(n_home.shape), where=n_home > 0)
        per_other = np.divide(1.0 - home_share, n_other, out=np.zeros(n_other.shape), where=n_other > 0)
        share = np.where(in_home, per_home[None, :], per_other[None, :])
        return (share * base[None, :]).ravel()

    def home_weighted_weights(self, home_factor: float) -> np.ndarray:
        """Starting weights in which every CD is a miniature of the country whose own state's households
        weigh ``home_factor`` times the others: CD ``c`` holds ``base_j * r_jc`` (``r`` = ``home_factor``
        for a household of ``c``'s state, else 1) scaled to ``sum(base) / n_cds``. A CD's start so depends
        on its own state only (the same in a one-state run as in the country); 1 is the proportional start."""
        if not np.isfinite(home_factor) or home_factor < 1:
            raise ValueError(f"home_factor={home_factor!r} must be >= 1")
        base = self._checked_base_weights()
        in_home = self.cd_states[:, None] == np.asarray(self.household_states)[None, :]  # (n_cds, n_households)
        w = np.where(in_home, home_factor, 1.0) * base[None, :]
        w *= base.sum() / self.n_cds / w.sum(axis=1, keepdims=True)
        return w.ravel()

    def base_allocation(self) -> np.ndarray:
        """Stacked weights that put each household's base weight in its home state, evenly over its CDs
        (zero elsewhere; a household whose state has no selected CD is left out)."""
        states, counts = np.unique(self.cd_states, return_counts=True)
        per_state = dict(zip(states.tolist(), counts.tolist()))
        n_home = np.array([per_state.get(int(s), 0) for s in self.household_states], dtype=np.float64)
        share = np.divide(1.0, n_home, out=np.zeros_like(n_home), where=n_home > 0)
        w = (self.cd_states[:, None] == np.asarray(self.household_states)[None, :]) * \
            (share * self.household_weights)[None, :]
        return w.ravel()
