"""Local-area datasets from calibrated weights, checked by independent re-simulation.

The run directory is made here: the geo-stacked matrix X is built on the fixture for
five CDs, weights are drawn by hand (a third of them zero), and the run files are
written as the entry point writes them. Expected figures come from X·w computed in the
test (restricted to each area's column blocks) and from fresh simulations of the base
file, never from the publish code.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from calibrate import outputs
from calibrate.core import pe
from calibrate.core.dataset import file_sha256, read_h5, write_h5
from calibrate.core.errors import CalibrateError
from calibrate.matrix import build_matrix
from calibrate.publish import main, normalize_argv, publish_run
from calibrate.publish.inputs import PublishInputError
from calibrate.publish.verify import PublishVerificationError
from calibrate.targets import TargetFilter
from calibrate.targets.geography import state_of_cd

PERIOD = 2024
CDS = [1101, 3701, 3702, 5001, 5601]  # DC, two NC districts, VT, WY
# geography, age, SNAP and Medicaid enrollment groups plus the national Medicaid dollar target
TARGETS = TargetFilter(stratum_group_ids=(1, 2, 4, 5), variables=("medicaid",))
ENTITIES = ("tax_unit", "spm_unit", "family", "marital_unit")


@pytest.fixture(scope="session")
def pub_dataset(fixture_dataset, tmp_path_factory):
    """The fixture plus ``weeks_unemployed`` for its unemployment-compensation recipients.

    Without weeks, policyengine-us treats every recipient as receiving all 12 months and the
    person-id hash that places the months has no effect; with them, it does (and feeds SNAP).
    """
    data = read_h5(fixture_dataset, PERIOD)
    recipient = data["unemployment_compensation"] > 0
    data["weeks_unemployed"] = np.where(recipient, 4 + 3 * (np.arange(len(recipient)) % 12), 0).astype(np.float64)
    return write_h5(data, tmp_path_factory.mktemp("pub_data") / "fixture_weeks.h5", PERIOD)


@pytest.fixture(scope="session")
def pub_matrix(pub_dataset, target_db, tmp_path_factory, tax_benefit_system):
    cache = tmp_path_factory.mktemp("pub_cache")
    return build_matrix(pub_dataset, CDS, TARGETS, PERIOD, target_db, workers=2, cache_dir=cache, progress=False)


@pytest.fixture(scope="session")
def pub_weights(pub_matrix):
    """Hand-made float32 weights: base weight x noise, about a third exactly zero."""
    rng = np.random.default_rng(7)
    n = pub_matrix.n_households * len(pub_matrix.cds)
    base = np.tile(pub_matrix.household_weights, len(pub_matrix.cds)) / len(pub_matrix.cds)
    w = base * rng.uniform(0.3, 1.7, n)
    w[rng.random(n) < 0.35] = 0.0
    return w.astype(np.float32)


def write_run(run_dir, matrix, weights, dataset, db):
    """The files of a finished run, as calibrate.run writes them."""
    table = outputs.targets_table(matrix.targets_df, outputs.estimates(matrix.X, weights.astype(np.float64)))
    outputs.write_npy(run_dir / "weights.npy", weights)
    outputs.write_csv(run_dir / "targets.csv", table)
    outputs.write_json(run_dir / "summary.json", {
        "status": "complete", "dataset_path": str(dataset), "dataset_sha256": file_sha256(dataset),
        "db_path": str(db), "cds": list(matrix.cds), "period": PERIOD, "n_households": matrix.n_households,
        "matrix_cache_key": matrix.cache_key,
    })
    return run_dir


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, pub_matrix, pub_weights, pub_dataset, target_db):
    return write_run(tmp_path_factory.mktemp("run"), pub_matrix, pub_weights, pub_dataset, target_db)


@pytest.fixture(scope="session")
def published(run_dir):
    """Every file written; a sample re-simulated (a CD, a state, the nation) to keep the test short."""
    return publish_run(run_dir, areas=["cd", "state", "national"], verify="sample", sample_size=3, workers=2)


def _file(published, name):
    return next(f for f in published.files if f.area == name)


def _area_columns(matrix, cds):
    n = matrix.n_households
    return np.concatenate([np.arange(n) + matrix.cds.index(cd) * n for cd in cds])


def test_resimulated_totals_equal_x_dot_w(published, pub_matrix, pub_weights):
    table = published.verification
    assert len(published.files) == 5 + 4 + 1 and published.n_verified_files == 3
    kinds = table.drop_duplicates("file").area.str.partition("_")[0].value_counts()
    assert kinds.to_dict() == {"cd": 1, "state": 1, "national": 1}
    assert (table.status != "mismatch").all()
    w = pub_weights.astype(np.float64)
    row_of = {t: i for i, t in enumerate(pub_matrix.targets_df.target_id)}
    for area, rows in table.groupby("area"):
        kind, _, code = area.partition("_")
        cds = CDS if kind == "national" else [cd for cd in CDS if (state_of_cd(cd) if kind == "state" else cd) == int(code)]
        cols = _area_columns(pub_matrix, cds)
        X = pub_matrix.X[[row_of[t] for t in rows.target_id]][:, cols].astype(np.float64)
        expected = X @ w[cols]
        comparable = (rows.status == "ok").to_numpy()
        np.testing.assert_allclose(rows.resimulated.to_numpy()[comparable], expected[comparable], rtol=1e-4, atol=1e-3)
        # the area's targets only: a CD's own, a state's and its CDs', all for the nation
        level, geo = rows.geo_level.to_numpy(), rows.geographic_id.to_numpy()
        assert np.all((level == "district") & np.isin(geo, cds) | (level == "state") & (kind != "cd")
                      | (kind == "national"))
    national = table.loc[table.area == "national"]
    assert len(national) == len(pub_matrix.targets_df)
    assert (national.status == "ok").sum() == len(national) - (national.variable == "medicaid").sum()


def test_medicaid_dollars_not_comparable_but_enrollment_counts_match(published):
    table = published.verification
    dollars = table.loc[table.variable == "medicaid"]
    assert len(dollars) == 1 and dollars.status.iloc[0] == "not_comparable"
    assert "medicaid_slcsp_state_denominator" in dollars.reason.iloc[0]
    # the quirk is real: the re-weighted file gives another Medicaid dollar total
    assert abs(dollars.resimulated.iloc[0] - dollars.estimate.iloc[0]) > 1e-3 * dollars.estimate.iloc[0]
    enrollment = table.loc[table.label.str.contains("medicaid>0")]
    assert len(enrollment) > 0 and (enrollment.status == "ok").all()


def test_ids_unique_and_links_resolve(published):
    for f in published.files:
        data = read_h5(f.path, PERIOD)
        hh = data["household_id"]
        assert len(np.unique(hh)) == len(hh) == f.n_households
        assert len(np.unique(data["person_id"])) == len(data["person_id"])
        assert np.isin(data["person_household_id"], hh).all()
        for e in ENTITIES:
            ids = data[f"{e}_id"]
            assert len(np.unique(ids)) == len(ids)
            link = data[f"person_{e}_id"]
            assert np.isin(link, ids).all() and np.isin(ids, link).all()
            # every group lies within one household
            pairs = pd.DataFrame({"g": link, "h": data["person_household_id"]}).drop_duplicates()
            assert pairs.g.is_unique
        cd_of_hh = pd.Series(data["congressional_district_geoid"], index=hh)
        assert np.array_equal(data["state_fips"], cd_of_hh.to_numpy() // 100)


def test_households_are_the_nonzero_weights(published, pub_matrix, pub_weights):
    n = pub_matrix.n_households
    for cd_idx, cd in enumerate(CDS):
        block = pub_weights[cd_idx * n:(cd_idx + 1) * n]
        mapping = pd.read_csv(_file(published, f"cd_{cd}").mapping_path)
        assert (block == 0).any()
        expected = pub_matrix.household_ids[block != 0]
        assert mapping.original_household_id.tolist() == expected.tolist()
        assert not np.isin(pub_matrix.household_ids[block == 0], mapping.original_household_id).any()
        np.testing.assert_array_equal(mapping.household_weight.to_numpy(), block[block != 0].astype(np.float64))
        data = read_h5(_file(published, f"cd_{cd}").path, PERIOD)
        np.testing.assert_array_equal(data["household_weight"], block[block != 0].astype(np.float64))
        # family_weight (an input in policyengine-us) follows the family's household
        family_hh = pd.Series(data["person_household_id"], index=data["person_family_id"]).groupby(level=0).first()
        np.testing.assert_array_equal(data["family_weight"], data["household_weight"][family_hh.loc[data["family_id"]]])


def _household_frame(path, mapping_path):
    """Per household: mapping columns + person count and summed person inputs (id-free content)."""
    data = read_h5(path, PERIOD)
    mapping = pd.read_csv(mapping_path)
    persons = pd.DataFrame({"hh": data["person_household_id"], "age": data["age"],
                            "income": data["employment_income"], "n": 1}).groupby("hh").sum()
    return mapping.join(persons, on="household_id").drop(columns="household_id")


def test_state_file_is_union_of_its_cd_files(published):
    nc = [_file(published, f"cd_{cd}") for cd in (3701, 3702)]
    union = pd.concat([_household_frame(f.path, f.mapping_path) for f in nc], ignore_index=True)
    state = _file(published, "state_37")
    pd.testing.assert_frame_equal(_household_frame(state.path, state.mapping_path), union)
    national = _file(published, "national")
    all_cds = pd.concat([_household_frame(_file(published, f"cd_{cd}").path, _file(published, f"cd_{cd}").mapping_path)
                         for cd in CDS], ignore_index=True)
    pd.testing.assert_frame_equal(_household_frame(national.path, national.mapping_path), all_cds)


def _household_snap(sim):
    return np.asarray(sim.calculate("snap", PERIOD, map_to="household", use_weights=False), dtype=np.float64)


def _uc_months(sim):
    """(n_persons, 12) whether each person receives unemployment compensation in each month."""
    return np.stack([np.asarray(sim.calculate("is_receiving_unemployment_compensation", f"{PERIOD}-{m:02d}",
                                              use_weights=False)) for m in range(1, 13)], axis=1)


def _person_keys(data, household_ids):
    """(original household id, rank of the person within the household) of each person."""
    row = pd.Index(data["household_id"]).get_indexer(data["person_household_id"])
    return list(zip(household_ids[row], pd.Series(row).groupby(row).cumcount()))


def test_snap_of_reindexed_households_equals_original(published, pub_dataset, tmp_path):
    f = _file(published, "state_37")
    mapping = pd.read_csv(f.mapping_path)
    base = pe.microsimulation(pub_dataset)
    base.set_input("state_fips", PERIOD, np.full(base.populations["household"].count, 37))
    base_data = read_h5(pub_dataset, PERIOD)
    expected = pd.Series(_household_snap(base), index=base_data["household_id"]).loc[mapping.original_household_id]
    assert (expected > 0).sum() > 10
    sim = pe.microsimulation(f.path)
    np.testing.assert_allclose(_household_snap(sim), expected.to_numpy(), rtol=1e-6)

    # the mechanism: each person's months of unemployment compensation (hashed from person_id) are kept
    data = read_h5(f.path, PERIOD)
    base_months = dict(zip(_person_keys(base_data, base_data["household_id"]), _uc_months(base)))
    expected_months = np.stack([base_months[k] for k in _person_keys(data, mapping.original_household_id.to_numpy())])
    assert 0 < expected_months.sum() < expected_months.size
    np.testing.assert_array_equal(_uc_months(sim), expected_months)
    # control: sequential person ids (hash classes not kept) move those months, so the check can fail
    data["person_id"] = np.arange(len(data["person_id"]), dtype=np.int64)
    sequential = write_h5(data, tmp_path / "sequential_ids.h5", PERIOD)
    assert (_uc_months(pe.microsimulation(sequential)) != expected_months).any()


def test_tampered_estimate_fails_with_listed_mismatch(run_dir, tmp_path):
    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad, ignore=shutil.ignore_patterns("datasets", "publish"))
    table = pd.read_csv(bad / "targets.csv")
    row = table.index[(table.geo_level == "district") & (table.geographic_id == 5001)
                      & (table.variable == "person_count")][0]
    table.loc[row, "estimate"] *= 1.01
    table.to_csv(bad / "targets.csv", index=False)
    with pytest.raises(PublishVerificationError, match=f"target {table.target_id[row]} "):
        publish_run(bad, areas=["cd:5001"], workers=1)
    written = pd.read_csv(bad / "publish" / "verification.csv")
    assert written.loc[written.status == "mismatch", "target_id"].tolist() == [table.target_id[row]]


def _copy_run(run_dir, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("datasets", "publish"))
    return dst


def _assert_nothing_written(run):
    assert not (run / "datasets").exists() and not (run / "publish").exists()


def test_bad_weights_length(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path)
    np.save(run / "weights.npy", np.load(run / "weights.npy")[:-1])
    with pytest.raises(PublishInputError, match="weights.npy.*households x 5 CDs"):
        publish_run(run, areas=["cd"])
    _assert_nothing_written(run)


def test_area_not_in_run(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path)
    with pytest.raises(PublishInputError, match="CD 3703 is not in the run"):
        publish_run(run, areas=["cd:3701", "cd:3703"])
    with pytest.raises(PublishInputError, match="state CA"):
        publish_run(run, areas=["state:CA"])
    with pytest.raises(PublishInputError, match="unknown kind 'county'"):
        publish_run(run, areas=["county:1"])
    _assert_nothing_written(run)


def test_run_from_another_dataset(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    summary["dataset_sha256"] = "0" * 64
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(CalibrateError, match="different dataset"):
        publish_run(run, areas=["national"])
    _assert_nothing_written(run)


@pytest.mark.parametrize("missing", ["weights.npy", "summary.json", "targets.csv"])
def test_missing_run_file(run_dir, tmp_path, missing):
    run = _copy_run(run_dir, tmp_path)
    (run / missing).unlink()
    with pytest.raises(PublishInputError, match=f"lacks {missing}"):
        publish_run(run, areas=["cd"])
    _assert_nothing_written(run)


def test_cli_shorthand_and_error_exit(run_dir, tmp_path, capsys):
    assert normalize_argv([f"run_dir={run_dir}", "area=cd:3701,state:37", "verify=sample", "workers=2"]) == [
        f"run_dir={run_dir}", "area=['cd:3701','state:37']", "verify=sample", "workers=2"]
    assert normalize_argv(["areas=national", "area=[cd]", "area=,"]) == ["area=['national']", "area=[cd]", "area=[]"]
    assert main(["area=cd"]) == 2 and "run_dir=... is required" in capsys.readouterr().err
    assert main([f"run_dir={run_dir}", "workers=two"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "workers" in err and err.count("\n") == 1
    run = _copy_run(run_dir, tmp_path)
    assert main([f"run_dir={run}", "area=cd:9999"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "CD 9999" in err and err.count("\n") == 1
    _assert_nothing_written(run)


def _written(run) -> dict:
    """Every file under a run dir that publishing added: relative path -> comparable content."""
    out = {}
    for path in sorted(run.rglob("*")):
        rel = str(path.relative_to(run))
        if not path.is_file() or rel in ("weights.npy", "targets.csv", "summary.json"):
            continue
        if path.suffix == ".h5":
            out[rel] = {k: v.tolist() for k, v in read_h5(path, PERIOD).items()}
        elif path.suffix == ".json":
            out[rel] = {k: v for k, v in json.loads(path.read_text()).items()
                        if not k.endswith("seconds") and k != "out_dir"}
        else:
            out[rel] = path.read_text().replace(str(run), "<run>")
    return out


def test_hydra_cli_writes_what_publish_run_writes(run_dir, tmp_path, monkeypatch, capsys):
    """``python -m calibrate.publish`` (the Hydra app, in process) writes the same files as the Python call."""
    by_call, by_cli = _copy_run(run_dir, tmp_path / "call"), _copy_run(run_dir, tmp_path / "cli")
    publish_run(by_call, areas=["cd:3701", "state:37"], verify="none", workers=1)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main([f"run_dir={by_cli}", "area=cd:3701,state:37", "verify=none", "workers=1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("publish: 2 files (1 cd, 1 state)") and str(by_cli / "datasets") in out
    expected = _written(by_call)
    assert {"datasets/cd_3701.h5", "datasets/state_37.h5", "publish/publish.json"} <= set(expected)
    assert _written(by_cli) == expected
    assert not list(work.iterdir())  # Hydra wrote nothing of its own (no .hydra/, no log, no outputs/)


def test_hydra_publish_node_with_options(run_dir, tmp_path):
    from omegaconf import OmegaConf

    node = OmegaConf.create({"enabled": True, "areas": ["cd:5001"], "options": {"verify": "none", "workers": 1,
                                                                                 "out_dir": str(tmp_path / "out")}})
    run = _copy_run(run_dir, tmp_path)
    result = publish_run(run, node)
    assert [f.path for f in result.files] == [tmp_path / "out" / "cd_5001.h5"] and result.n_verified_files == 0
    assert len(result.verification) == 0
    bad = OmegaConf.create({"areas": ["cd"], "options": {"verfy": "all"}})
    with pytest.raises(PublishInputError, match="'verfy'"):
        publish_run(run, bad)
