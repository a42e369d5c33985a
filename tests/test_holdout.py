"""Holdout split, train/holdout figures, the tuning score and the sweep picture.

Pure functions on synthetic frames checked against brute-force counts; the fit check runs
the real JAX fit through ``calibrate.app.fitting.fit_stage`` on a small random problem.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from calibrate.outputs import evaluation, plots
from calibrate.reconcile import HOLDOUT, TRAIN, HoldoutError, HoldoutSpec, split_targets

# (stratum_group_id, variable, geo_level, n targets)
STRATA = [(2, "person_count", "state", 18), (2, "person_count", "district", 90), (4, "snap", "state", 2),
          (4, "snap", "district", 9), (5, "medicaid", "state", 1), (1, "household_count", "district", 5)]


def _targets(seed: int = 0) -> pd.DataFrame:
    rows = [(g, v, lvl) for g, v, lvl, n in STRATA for _ in range(n)]
    frame = pd.DataFrame(rows, columns=["stratum_group_id", "variable", "geo_level"])
    frame["target_id"] = np.random.default_rng(seed).permutation(len(frame)) + 100
    return frame


def test_random_share_is_stratified_and_keeps_a_training_target():
    targets = _targets()
    split = split_targets(targets, HoldoutSpec(share=0.2, seed=4))
    assert set(split) == {TRAIN, HOLDOUT}
    for g, _, lvl, n in STRATA:  # brute force: round(0.2 n), at most n - 1, per stratum
        in_stratum = ((targets.stratum_group_id == g) & (targets.geo_level == lvl)).to_numpy()
        assert (split[in_stratum] == HOLDOUT).sum() == min(int(0.2 * n + 0.5), n - 1), (g, lvl)


def test_split_is_deterministic_and_ignores_row_order():
    targets = _targets()
    spec = HoldoutSpec(share=0.3, seed=7)
    first = dict(zip(targets.target_id, split_targets(targets, spec)))
    shuffled = targets.sample(frac=1.0, random_state=1).reset_index(drop=True)
    assert dict(zip(shuffled.target_id, split_targets(shuffled, spec))) == first
    other = dict(zip(targets.target_id, split_targets(targets, dataclasses.replace(spec, seed=8))))
    assert other != first
    # a stratum's draw does not depend on which other strata the run selected
    snap = targets[targets.variable == "snap"].reset_index(drop=True)
    assert dict(zip(snap.target_id, split_targets(snap, spec))) == {t: first[t] for t in snap.target_id}


def test_named_groups_and_levels():
    targets = _targets()
    split = split_targets(targets, HoldoutSpec(stratum_group_ids=(4,), levels=("state",)))
    expected = (targets.stratum_group_id == 4) | (targets.geo_level == "state")
    assert list(split == HOLDOUT) == list(expected)
    by_variable = split_targets(targets, HoldoutSpec(variables=("medicaid", "household_count")))
    assert list(by_variable == HOLDOUT) == list(targets.variable.isin(["medicaid", "household_count"]))
    # named groups plus a random share of the rest
    both = split_targets(targets, HoldoutSpec(share=0.5, variables=("snap",), seed=1))
    assert (both[targets.variable == "snap"] == HOLDOUT).all()
    age_district = ((targets.variable == "person_count") & (targets.geo_level == "district")).to_numpy()
    assert (both[age_district] == HOLDOUT).sum() == 45
    assert (split_targets(targets, HoldoutSpec()) == TRAIN).all()


@pytest.mark.parametrize(
    "spec, needle",
    [(HoldoutSpec(share=1.0), "holdout.share"), (HoldoutSpec(share=-0.1), "holdout.share"),
     (HoldoutSpec(levels=("county",)), "'county'"), (HoldoutSpec(variables=("eitc",)), "holdout.variables: 'eitc'"),
     (HoldoutSpec(stratum_group_ids=(9,)), "holdout.stratum_group_ids: 9"),
     (HoldoutSpec(levels=("state", "district")), "nothing left to fit")],
)
def test_bad_holdout_is_named(spec, needle):
    with pytest.raises(HoldoutError, match=needle.replace("(", r"\(")):
        split_targets(_targets(), spec)


def _table(seed: int = 0) -> pd.DataFrame:
    targets = _targets(seed)
    rng = np.random.default_rng(seed)
    targets["abs_rel_error"] = rng.lognormal(-4, 1.5, len(targets))
    targets["split"] = split_targets(targets, HoldoutSpec(share=0.25, seed=seed))
    return targets


def test_split_errors_match_brute_force():
    table = _table()
    errors = evaluation.split_errors(table)
    assert list(errors) == [TRAIN, HOLDOUT]
    assert list(errors[HOLDOUT]) == ["state", "district", "all"]
    for split in (TRAIN, HOLDOUT):
        for level in ("state", "district", "all"):
            rows = table[(table.split == split) & ((table.geo_level == level) | (level == "all"))]
            err = np.sort(rows.abs_rel_error.to_numpy())
            got = errors[split][level]
            assert got["n"] == len(err) and got["max"] == err[-1]
            assert got["median"] == pytest.approx((err[(len(err) - 1) // 2] + err[len(err) // 2]) / 2)
            assert got["p95"] == pytest.approx(np.quantile(err, 0.95))
    # score: the worst level's holdout median; without a holdout, the worst level's training median
    medians = table[table.split == HOLDOUT].groupby("geo_level").abs_rel_error.median()
    assert evaluation.tuning_score(errors) == pytest.approx(medians.max())
    plain = evaluation.split_errors(table.drop(columns="split"))
    assert list(plain) == [TRAIN] and plain[TRAIN]["all"]["n"] == len(table)
    assert evaluation.tuning_score(plain) == pytest.approx(table.groupby("geo_level").abs_rel_error.median().max())
    flat = evaluation.flat_split_errors(errors)
    assert flat["holdout_district_p95"] == errors[HOLDOUT]["district"]["p95"] and len(flat) == 2 * 3 * 4


def test_split_errors_give_the_truths_own_error_from_published_margins():
    """With published relative SEs each figure also says what the true values would score: the
    pooled quantiles of many drawn |N(0, se)| errors, over the targets that have a margin."""
    table = _table()
    rng = np.random.default_rng(5)
    se = rng.uniform(0.01, 0.15, len(table))
    se[rng.random(len(table)) < 0.3] = np.nan  # administrative totals publish no margin
    table["published_rel_se"] = se
    errors = evaluation.split_errors(table)
    draws = np.abs(np.random.default_rng(6).standard_normal((20_000, len(table))) * se)
    for split in (TRAIN, HOLDOUT):
        for level in ("state", "district", "all"):
            rows = ((table.split == split) & ((table.geo_level == level) | (level == "all"))).to_numpy()
            has = rows & np.isfinite(se)
            got = errors[split][level]
            assert got["n_margin"] == has.sum() and got["n"] == rows.sum()
            pooled = draws[:, has].ravel()
            assert got["truth_median"] == pytest.approx(np.quantile(pooled, 0.5), rel=0.01)
            assert got["truth_p95"] == pytest.approx(np.quantile(pooled, 0.95), rel=0.01)
    table["published_rel_se"] = np.nan  # no margin anywhere: the plain figures
    assert evaluation.split_errors(table) == evaluation.split_errors(table.drop(columns="published_rel_se"))


def _fit_problem(seed: int = 0, m: int = 30, n_hh: int = 40):
    """A 2-CD problem in the shape fit_stage expects (targets_df, X, household layout)."""
    rng = np.random.default_rng(seed)
    cds = [3701, 3702]
    X = sp.random(m, n_hh * len(cds), density=0.3, random_state=rng, format="csr",
                  data_rvs=lambda k: rng.uniform(0.5, 3.0, k))
    values = X @ rng.uniform(5.0, 20.0, X.shape[1])
    targets_df = pd.DataFrame({
        "target_id": np.arange(m), "stratum_group_id": np.repeat([2, 4], m // 2),
        "geo_level": np.tile(["state", "district", "district"], m // 3), "value": values,
    })
    targets_df["variable"] = np.where(targets_df.stratum_group_id == 2, "person_count", "snap")
    targets_df["group_id"] = pd.factorize(targets_df.variable + "|" + targets_df.geo_level)[0]
    from calibrate.matrix.layout import StackedLayout

    layout = StackedLayout.of(cds, np.arange(n_hh), np.full(n_hh, 10.0), np.full(n_hh, 37))
    return SimpleNamespace(targets_df=targets_df, X=X, layout=layout)


def _fit_with_split(matrix, l0, tmp_path, split):
    """fit_stage on the level-balanced loss with held-out targets at weight 0 (as a run does)."""
    from calibrate.app.fitting import fit_stage
    from calibrate.reconcile import loss_weights

    in_loss = None if split is None else split == TRAIN
    weights = loss_weights(matrix.targets_df, "level", in_loss)
    return fit_stage(matrix, l0, tmp_path, False, matrix.targets_df.value.to_numpy(), weights)[0]


def test_held_out_targets_do_not_change_the_fit(tmp_path):
    """Moving held-out target values leaves the weights bit-identical; moving a training target does not."""
    from calibrate.fit import FitConfig, SparsityConfig

    l0 = FitConfig(epochs=60, lr=0.1, log_every=20, chunk_epochs=20, seed=3, sparsity=SparsityConfig(active_share=None),
                   polish_share=0.0)
    matrix = _fit_problem()
    split = split_targets(matrix.targets_df, HoldoutSpec(share=0.3, seed=2))
    held = np.flatnonzero(split == HOLDOUT)
    base = _fit_with_split(matrix, l0, tmp_path, split)

    moved = SimpleNamespace(**vars(matrix))
    moved.targets_df = matrix.targets_df.copy()
    moved.targets_df.loc[held, "value"] *= 3.0
    np.testing.assert_array_equal(_fit_with_split(moved, l0, tmp_path, split).weights, base.weights)

    moved.targets_df = matrix.targets_df.copy()
    moved.targets_df.loc[np.flatnonzero(split == TRAIN)[0], "value"] *= 3.0
    assert not np.array_equal(_fit_with_split(moved, l0, tmp_path, split).weights, base.weights)
    # the fit's own history reports the training targets only
    est = matrix.X @ base.weights.astype(np.float64)
    value = matrix.targets_df.value.to_numpy()
    train_err = np.abs(est - value)[split == TRAIN] / (value[split == TRAIN] + 1)
    assert base.history["max_abs_rel_error"].iloc[-1] == pytest.approx(train_err.max(), rel=1e-3)
    # without a holdout every target is fitted: a different fit
    no_holdout = _fit_with_split(matrix, l0, tmp_path, None)
    assert np.array_equal(no_holdout.weights, _fit_with_split(matrix, l0, tmp_path, np.full(30, TRAIN)).weights)
    assert not np.array_equal(no_holdout.weights, base.weights)


def test_plot_sweep_draws_the_table(tmp_path):
    table = pd.DataFrame({
        "job": ["0", "1", "2", "3"], "status": ["complete", "failed", "complete", "incomplete"],
        "error": ["", "fit: lr must be > 0", "", ""],
        "fraction_zero_weights": [0.1, np.nan, 0.4, np.nan], "total_seconds": [12.0, np.nan, 30.0, np.nan],
        "train_all_median": [0.01, np.nan, 0.02, np.nan], "holdout_all_median": [0.05, np.nan, 0.04, np.nan],
    })
    drawn = plots.plot_sweep(table, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert drawn["not_complete"] == ["1", "3"]
    for x in ("fraction_zero_weights", "total_seconds"):
        for y in ("train_all_median", "holdout_all_median"):
            jobs, points = drawn[(x, y)]
            assert jobs == ["0", "2"]
            np.testing.assert_allclose(points, table.loc[[0, 2], [x, y]].to_numpy())
    # a sweep without holdout draws the training errors only
    drawn = plots.plot_sweep(table.drop(columns="holdout_all_median"), tmp_path / "plain.png")
    assert ("total_seconds", "holdout_all_median") not in drawn and ("total_seconds", "train_all_median") in drawn


def test_family_holdouts_hold_out_exactly_the_family():
    """Whole-family holdouts (conf/holdout/snap_district, medicaid_state, age65) against a direct reading."""
    import pandas as pd

    from calibrate.reconcile.holdout import HoldoutFamily, HoldoutSpec, split_targets
    from calibrate.targets.selection import Constraint

    rows = []
    for i, (group, level, variable, cons) in enumerate([
        (4, "district", "household_count", (Constraint("snap", ">", "0"),)),
        (4, "state", "snap", ()),
        (5, "state", "person_count", (Constraint("medicaid_enrolled", "==", "True"),)),
        (2, "district", "person_count", (Constraint("age", ">=", "65"), Constraint("age", "<", "70"))),
        (2, "district", "person_count", (Constraint("age", ">=", "60"), Constraint("age", "<", "65"))),
        (2, "state", "person_count", (Constraint("age", ">", "84"),)),
        (1, "district", "person_count", ()),
    ]):
        rows.append(dict(target_id=i + 1, stratum_group_id=group, geo_level=level, variable=variable, constraints=cons))
    targets = pd.DataFrame(rows)

    def held(*families):
        return (split_targets(targets, HoldoutSpec(families=families)) == "holdout").tolist()

    assert held(HoldoutFamily(stratum_group_ids=(4,), levels=("district",))) == [1, 0, 0, 0, 0, 0, 0]
    assert held(HoldoutFamily(stratum_group_ids=(5,), levels=("state",))) == [0, 0, 1, 0, 0, 0, 0]
    assert held(HoldoutFamily(stratum_group_ids=(2,), age_from=65)) == [0, 0, 0, 1, 0, 1, 0]
    assert held(HoldoutFamily(stratum_group_ids=(4,), levels=("district",)),
                HoldoutFamily(stratum_group_ids=(2,), age_from=65)) == [1, 0, 0, 1, 0, 1, 0]


def test_every_holdout_config_composes_and_soi_holds_out_the_soi_family_only():
    """Each conf/holdout/*.yaml gives a valid spec; holdout=soi holds out stratum group 9 and nothing else."""
    from hydra import compose, initialize_config_dir

    from calibrate.app.config import CONF_DIR, holdout_spec, to_config

    names = sorted(p.stem for p in (CONF_DIR / "holdout").glob("*.yaml"))
    assert {"none", "random", "soi", "snap_district"} <= set(names)
    specs = {}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for name in names:
            specs[name] = holdout_spec(to_config(compose("config", overrides=[f"holdout={name}"])).holdout,
                                       ["district", "state", "national"])
    rows = [dict(target_id=i + 1, stratum_group_id=g, geo_level=lvl, variable="tax_unit_count", constraints=())
            for i, (g, lvl) in enumerate([(9, "national"), (9, "national"), (7, "national"), (1, "state"),
                                          (2, "district")])]
    split = split_targets(pd.DataFrame(rows), specs["soi"])
    assert (split == HOLDOUT).tolist() == [True, True, False, False, False]
