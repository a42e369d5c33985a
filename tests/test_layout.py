"""The stacked layout (calibrate.matrix.layout): the one owner of the column geometry."""

from __future__ import annotations

import numpy as np
import pytest

from calibrate.matrix.layout import StackedLayout

# CDs 601, 602 (CA), 3601 (NY), 4801, 4802 (TX); households from CA, NY and state 99 (no CD)
LAYOUT = StackedLayout.of([601, 602, 3601, 4801, 4802], [11, 22, 33], [100.0, 60.0, 30.0], [6, 36, 99])


def test_columns_are_cd_major_and_split_back():
    cols = LAYOUT.column(np.repeat(np.arange(5), 3), np.tile(np.arange(3), 5))
    np.testing.assert_array_equal(cols, np.arange(15))  # block of CD k = columns 3k..3k+2
    cd, hh = LAYOUT.split([0, 4, 14])
    assert cd.tolist() == [0, 1, 4] and hh.tolist() == [0, 1, 2]
    assert LAYOUT.household_of([4, 7, 14]).tolist() == [1, 1, 2]
    assert LAYOUT.column_groups().tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert LAYOUT.cd_states.tolist() == [6, 6, 36, 48, 48] and LAYOUT.states == (6, 36, 48)
    assert LAYOUT.n_columns == 15 and LAYOUT.per_cd(np.arange(15.0))[3].tolist() == [9.0, 10.0, 11.0]
    with pytest.raises(ValueError, match=r"expected \(15,\) = 5 CDs x 3 households"):
        LAYOUT.per_cd(np.zeros(14))


def test_initial_weights_closed_form():
    w = LAYOUT.initial_weights(home_state_share=0.8).reshape(5, 3)  # CD-major
    np.testing.assert_allclose(w.sum(axis=0), [100.0, 60.0, 30.0])
    np.testing.assert_allclose(w[:, 0], [40, 40, 20 / 3, 20 / 3, 20 / 3])
    np.testing.assert_allclose(w[:, 1], [3, 3, 48, 3, 3])
    np.testing.assert_allclose(w[:, 2], np.full(5, 6.0))
    assert np.all(w > 0)
    with pytest.raises(ValueError, match="home_state_share"):
        LAYOUT.initial_weights(home_state_share=1.0)
    with pytest.raises(ValueError, match="household_weights"):
        StackedLayout.of([601], [1, 2], [1.0, -1.0], [6, 6]).initial_weights()


def test_home_weighted_weights_closed_form():
    """Each CD: base weights with its own state's households x the factor, scaled to total / n_cds."""
    w = LAYOUT.home_weighted_weights(4.0).reshape(5, 3)
    total = 190.0 / 5  # every CD starts with the same share of the base total
    ca = np.array([400.0, 60.0, 30.0])  # CA CDs: the CA household x4
    ny = np.array([100.0, 240.0, 30.0])
    tx = np.array([100.0, 60.0, 30.0])  # no TX household: the proportional mix
    for row, raw in zip(w, [ca, ca, ny, tx, tx]):
        np.testing.assert_allclose(row, raw * total / raw.sum())
    np.testing.assert_allclose(LAYOUT.home_weighted_weights(1.0), LAYOUT.initial_weights(None))
    # a CD's start depends on its own state only: the NY CD alone starts as in the five-CD layout
    alone = StackedLayout.of([3601], [11, 22, 33], [100.0, 60.0, 30.0], [6, 36, 99]).home_weighted_weights(4.0)
    np.testing.assert_allclose(alone / alone.sum(), w[2] / w[2].sum())
    for bad in (0.5, float("nan")):
        with pytest.raises(ValueError, match="home_factor"):
            LAYOUT.home_weighted_weights(bad)


def test_base_allocation_and_home_columns():
    w = LAYOUT.base_allocation().reshape(5, 3)
    np.testing.assert_allclose(w[:, 0], [50, 50, 0, 0, 0])  # CA household: half in each CA CD
    np.testing.assert_allclose(w[:, 1], [0, 0, 60, 0, 0])
    np.testing.assert_allclose(w[:, 2], 0.0)  # state 99 has no CD
    assert LAYOUT.home_state_columns().tolist() == [0, 7, -1]  # first CD of the own state
    assert LAYOUT.home_state_columns(48).tolist() == [9, 10, 11]  # everyone placed in TX-01
    assert LAYOUT.home_state_columns(1).tolist() == [-1, -1, -1]


def test_active_per_cd():
    weights = np.zeros(15)
    weights[[0, 1, 3, 6, 7, 8]] = 1.0  # CDs with 2, 1, 3, 0, 0 active households
    assert LAYOUT.active_per_cd(weights) == {"min": 0, "median": 1.0, "max": 3, "median_share": 1 / 3}
