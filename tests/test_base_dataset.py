"""Base household datasets: real policyengine-us over the built files, checked against the CSV."""

from __future__ import annotations

import gzip
import json

import h5py
import numpy as np
import pandas as pd
import pytest

from calibrate.core import paths
from calibrate.core.dataset import (
    DatasetError,
    file_sha256,
    read_h5,
    validate_dataset,
    write_h5,
)
from calibrate.etl import base_dataset, cps_health
from calibrate.etl.cps import SourceDataError

CSV = paths.SOURCES / "microdata" / "taxcalc_cps.csv.gz"
FILES = {"fixture": paths.FIXTURE_DATASET, "default": paths.DEFAULT_DATASET}


# ---------------------------------------------------------------- shared fixtures
@pytest.fixture(scope="session")
def source():
    """The extract, read independently, indexed by RECID."""
    return pd.read_csv(CSV).set_index("RECID", drop=False).rename_axis("recid")


@pytest.fixture(scope="session")
def arrays():
    return {name: read_h5(path) for name, path in FILES.items()}


@pytest.fixture(scope="session")
def tbs():
    from calibrate.core import pe

    return pe.tax_benefit_system()


@pytest.fixture(scope="session")
def fixture_sim(tbs):
    from calibrate.core import pe

    return pe.microsimulation(paths.FIXTURE_DATASET)


def calc(sim, name):
    return np.asarray(sim.calculate(name, 2024).values, dtype=float)


def household_bases(source: pd.DataFrame) -> pd.DataFrame:
    """Per source household: state and the first tax unit's (lowest a_lineno) s006/100."""
    first = source.sort_values(["FLPDYR", "fips", "h_seq", "a_lineno", "RECID"]).groupby(["FLPDYR", "fips", "h_seq"]).first()
    return pd.DataFrame({"fips": first.index.get_level_values("fips"), "base": first["s006"].to_numpy() / 100})


# ---------------------------------------------------------------- policyengine-us loads the files
def test_policyengine_computes_fixture(fixture_sim, arrays, source):
    a = arrays["fixture"]
    snap = calc(fixture_sim, "snap")
    assert snap.shape == a["spm_unit_id"].shape and (snap > 0).any()
    # SNAP only where the household reported SNAP in the source (take-up follows reports).
    reported = source.loc[a["tax_unit_id"]].groupby(["FLPDYR", "fips", "h_seq"])["snap_ben"].sum() > 0
    assert reported.sum() == a["takes_up_snap_if_eligible"].sum()
    assert not (snap[~a["takes_up_snap_if_eligible"]] > 0).any()
    medicaid = calc(fixture_sim, "medicaid")
    assert (medicaid > 0).any() and not (medicaid[~a["takes_up_medicaid_if_eligible"]] > 0).any()
    agi, eitc = calc(fixture_sim, "adjusted_gross_income"), calc(fixture_sim, "eitc")
    assert agi.shape == a["tax_unit_id"].shape and np.isfinite(agi).all() and (eitc > 0).any()
    np.testing.assert_allclose(calc(fixture_sim, "age"), a["age"])
    assert fixture_sim.calculate("person_count", 2024).sum() == pytest.approx(
        sum(a["household_weight"][a["household_id"] == h][0] for h in a["person_household_id"]), rel=1e-6
    )
    assert fixture_sim.calculate("household_count", 2024).sum() == pytest.approx(a["household_weight"].sum(), rel=1e-6)
    # Tax-unit roles are the extract's: a joint filer's unit has a spouse.
    filing = fixture_sim.calculate("filing_status", 2024).values
    joint = source.loc[a["tax_unit_id"], "MARS"].to_numpy() == 2
    assert (filing[joint] == "JOINT").all()


def test_policyengine_loads_default_file(arrays):
    """Loading and cheap variables only: SNAP over the 12k households is checked on the
    fixture here and totalled over this file by the build's sanity figures."""
    from calibrate.core import pe

    a = arrays["default"]
    sim = pe.microsimulation(paths.DEFAULT_DATASET)
    assert sim.calculate("household_count", 2024).sum() == pytest.approx(a["household_weight"].sum(), rel=1e-6)
    np.testing.assert_array_equal(calc(sim, "household_id"), a["household_id"])
    np.testing.assert_allclose(calc(sim, "age"), a["age"])
    np.testing.assert_array_equal(calc(sim, "state_fips"), a["state_fips"])


# ---------------------------------------------------------------- structure
@pytest.mark.parametrize("name", FILES)
def test_entity_membership(arrays, name):
    a = arrays[name]
    validate_dataset(FILES[name])
    n = len(a["person_id"])
    assert len(np.unique(a["person_id"])) == n
    for entity in ("household", "tax_unit", "spm_unit", "family", "marital_unit"):
        ids, links = a[f"{entity}_id"], a[f"person_{entity}_id"]
        assert len(links) == n and len(np.unique(ids)) == len(ids), entity
        assert set(links.tolist()) == set(ids.tolist()), entity  # each person in one existing unit; none empty
    hh_of_unit = pd.Series(a["person_household_id"]).groupby(a["person_tax_unit_id"]).nunique()
    assert (hh_of_unit == 1).all()  # a tax unit never spans households
    heads = pd.Series(a["is_tax_unit_head"]).groupby(a["person_tax_unit_id"]).sum()
    spouses = pd.Series(a["is_tax_unit_spouse"]).groupby(a["person_tax_unit_id"]).sum()
    assert (heads == 1).all() and (spouses <= 1).all()
    marital = pd.DataFrame({"m": a["person_marital_unit_id"], "hs": a["is_tax_unit_head"] | a["is_tax_unit_spouse"], "t": a["person_tax_unit_id"]})
    sizes = marital.groupby("m").agg(size=("hs", "size"), hs=("hs", "sum"), t=("t", "nunique"))
    assert (sizes["size"] <= 2).all() and (sizes.loc[sizes["size"] == 2, "hs"] == 2).all() and (sizes["t"] == 1).all()
    assert (pd.Series(a["is_household_head"]).groupby(a["person_household_id"]).sum() == 1).all()


@pytest.mark.parametrize("name", FILES)
def test_ages_match_source_counts(arrays, source, name):
    a = arrays[name]
    rows = source.loc[a["tax_unit_id"]]
    p = pd.DataFrame({"t": a["person_tax_unit_id"], "age": a["age"], "dep": a["is_tax_unit_dependent"],
                      "is_head": a["is_tax_unit_head"], "is_spouse": a["is_tax_unit_spouse"]})
    head_age = p[p.is_head].set_index("t")["age"].reindex(rows.index)
    np.testing.assert_array_equal(head_age.to_numpy(), rows["age_head"].to_numpy())
    spouse_age = p[p.is_spouse].set_index("t")["age"]
    married = rows[rows["MARS"] == 2]
    np.testing.assert_array_equal(spouse_age.reindex(married.index).to_numpy(), married["age_spouse"].to_numpy())
    assert set(spouse_age.index) == set(married.index)

    def count(mask):
        return p[mask].groupby("t").size().reindex(rows.index, fill_value=0).to_numpy()

    dep, age = p.dep, p.age
    counts = {"nu06": count(dep & (age < 6)), "nu13": count(dep & (age < 13)), "n24": count(dep & (age < 17)),
              "nu18": count(age < 18), "n1820": count((age >= 18) & (age <= 20)), "n21": count(age >= 21),
              "elderly_dependents": count(dep & (age >= 65))}
    # Rows whose counts are internally consistent must be reproduced exactly.
    hs_under18 = (rows["age_head"] < 18).astype(int) + ((rows["MARS"] == 2) & (rows["age_spouse"] < 18))
    consistent = ((rows["nu06"] <= rows["nu13"]) & (rows["nu13"] <= rows["n24"]) & (rows["n24"] <= rows["nu18"] - hs_under18)
                  & (rows["nu18"] + rows["n1820"] + rows["n21"] == rows["XTOT"])).to_numpy()
    assert consistent.mean() > 0.98
    for col, recount in counts.items():
        np.testing.assert_array_equal(recount[consistent], rows[col].to_numpy()[consistent], err_msg=col)


@pytest.mark.parametrize("name", FILES)
def test_weights_preserve_state_totals(arrays, source, name):
    """Household weight = first tax unit's s006/100, scaled within each state stratum."""
    a = arrays[name]
    bases = household_bases(source)
    file_totals = pd.Series(a["household_weight"]).groupby(a["state_fips"]).sum()
    source_totals = bases.groupby("fips")["base"].sum()
    np.testing.assert_allclose(file_totals.to_numpy(), source_totals.loc[file_totals.index].to_numpy(), rtol=1e-9)
    if name == "default":
        assert len(file_totals) == 51
    # Each file household is a whole source household, weighted up from its first unit's s006/100.
    key_cols = ["FLPDYR", "fips", "h_seq"]
    units = pd.DataFrame({"hh": a["person_household_id"], "recid": a["person_tax_unit_id"]}).drop_duplicates()
    units[key_cols] = source.loc[units["recid"], key_cols].to_numpy()
    assert (units.groupby("hh")[key_cols].nunique() == 1).all().all()
    source_units = source.groupby(key_cols).size()
    file_units = units.groupby(key_cols).size()
    np.testing.assert_array_equal(file_units.to_numpy(), source_units.loc[file_units.index].to_numpy())
    first = source.sort_values(["a_lineno", "RECID"]).groupby(key_cols)["s006"].first() / 100
    hh_key = units.groupby("hh")[key_cols].first()
    base = first.loc[pd.MultiIndex.from_frame(hh_key.loc[a["household_id"]])].to_numpy()
    ratio = a["household_weight"] / base
    assert ratio.min() >= 1 - 1e-12
    if name == "default":  # the top-income stratum keeps its own weights
        assert (np.abs(ratio - 1) < 1e-12).sum() >= 0.005 * len(ratio)


def test_uprating_factor_from_policyengine_parameter(arrays, source, tbs):
    cpi = tbs.parameters.gov.bls.cpi.cpi_u
    a = arrays["default"]
    heads = a["is_tax_unit_head"]
    rows = source.loc[a["person_tax_unit_id"][heads]]
    wages = rows["e00200p"].to_numpy(float)
    years = rows["FLPDYR"].to_numpy()
    expected = wages * np.array([cpi("2024-01-01") / cpi(f"{y}-01-01") for y in years])
    np.testing.assert_allclose(a["employment_income"][heads], expected, rtol=1e-6)
    assert len(set(years)) == 3


def test_fixture_spans_states_with_a_one_district_state(arrays):
    rows = json.loads((paths.SOURCES / "census" / "acs5_congressional_districts_2024.json").read_text())
    col = rows[0].index("state")
    districts = pd.Series([int(r[col]) for r in rows[1:]]).value_counts()
    states = set(arrays["fixture"]["state_fips"].tolist())
    assert len(states) >= 3 and any(districts[s] == 1 for s in states)
    assert 200 <= len(arrays["fixture"]["household_id"]) <= 400


def test_health_imputation_reproduces_band_totals(arrays):
    """Full population at base weights: weighted band sums equal the CSV totals."""
    table = pd.read_csv(paths.SOURCES / "census" / "healthcare_spending.csv")
    pop, _ = base_dataset.load_population(paths.SOURCES, seed=0)
    weight = pop.households.weight[pop.row_household[pop.persons.row]]
    band = np.minimum(pop.persons.age // 10, 8)
    for column, variable in cps_health.HEALTH_VARIABLES.items():
        sums = np.bincount(band.astype(int), weights=weight * pop.person_vars[variable], minlength=9)
        np.testing.assert_allclose(sums, table[column].to_numpy(), rtol=1e-5, atol=1.0)
    # Files carry the same per-person amounts as the full population.
    a = arrays["fixture"]
    full = dict(zip(pop.ids.person_id.tolist(), pop.person_vars["other_medical_expenses"].tolist()))
    np.testing.assert_array_equal(a["other_medical_expenses"], [full[i] for i in a["person_id"].tolist()])


# ---------------------------------------------------------------- determinism and bad input
def test_rebuild_is_deterministic(tmp_path, arrays):
    report = base_dataset.build_datasets(out_dir=tmp_path, seed=0, simulate=False, only_fixture=True)
    rebuilt = read_h5(tmp_path / base_dataset.FIXTURE_NAME)
    assert set(rebuilt) == set(arrays["fixture"])
    for name, values in rebuilt.items():
        assert values.dtype == arrays["fixture"][name].dtype and values.tobytes() == arrays["fixture"][name].tobytes(), name
    assert report.files[base_dataset.FIXTURE_NAME].households == len(rebuilt["household_id"])
    assert file_sha256(tmp_path / base_dataset.FIXTURE_NAME) == file_sha256(paths.FIXTURE_DATASET)
    other = base_dataset.build_datasets(out_dir=tmp_path / "s1", seed=1, simulate=False, only_fixture=True)
    assert not np.array_equal(read_h5(other.files[base_dataset.FIXTURE_NAME].path)["household_id"], rebuilt["household_id"])


def _sources_with(tmp_path, edit):
    """A sources folder with the first 300 CSV rows after ``edit(df)``."""
    (tmp_path / "microdata").mkdir(parents=True)
    (tmp_path / "census").mkdir()
    (tmp_path / "census" / "healthcare_spending.csv").write_bytes((paths.SOURCES / "census" / "healthcare_spending.csv").read_bytes())
    df = edit(pd.read_csv(CSV, nrows=300))
    with gzip.open(tmp_path / "microdata" / "taxcalc_cps.csv.gz", "wt") as f:
        df.to_csv(f, index=False)
    return tmp_path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda df: df.drop(columns=["nu06"]), "nu06"),
        (lambda df: df.assign(fips=np.where(np.arange(len(df)) == 5, 99, df["fips"])), "99"),
        (lambda df: df.assign(e00200p=df["e00200p"].astype(object).where(df.index != 3, "abc")), "e00200p"),
    ],
)
def test_bad_source_raises_and_writes_nothing(tmp_path, edit, message):
    sources = _sources_with(tmp_path / "src", edit)
    out = tmp_path / "out"
    with pytest.raises(SourceDataError, match=message) as info:
        base_dataset.build_datasets(sources_dir=sources, out_dir=out, simulate=False)
    assert "taxcalc_cps.csv.gz" in str(info.value)
    assert not out.exists() or not any(out.iterdir())


def test_missing_source_file_is_named(tmp_path):
    with pytest.raises(SourceDataError, match="taxcalc_cps.csv.gz"):
        base_dataset.build_datasets(sources_dir=tmp_path, out_dir=tmp_path / "out", simulate=False)


def test_dataset_helpers_report_missing_and_write_atomically(tmp_path):
    path = write_h5({"household_id": np.array([1, 2])}, tmp_path / "d.h5")
    with h5py.File(path) as f:
        assert list(f["household_id"].keys()) == ["2024"]
    with pytest.raises(DatasetError, match="'household_weight'"):
        validate_dataset(path, required=("household_id", "household_weight"))
    with pytest.raises(DatasetError, match="not found"):
        read_h5(tmp_path / "missing.h5")
    bad = {"a": np.arange(3), "b": np.array(["2020-01-01"], dtype="datetime64[D]")}
    with pytest.raises(DatasetError, match="'b'"):
        write_h5(bad, tmp_path / "bad.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5"]
