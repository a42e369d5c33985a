"""Build the base household datasets (policyengine-us h5) from the public CPS extract.

``python -m calibrate.etl.base_dataset`` rebuilds ``cps_2024_stratified.h5`` (default,
about 12k households) and ``cps_2024_fixture.h5`` (300 households in DC, NC, VT, WY)
and prints a report with sanity figures. See ``docs/dataset.md``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibrate.core import paths
from calibrate.core.dataset import file_sha256, read_h5, validate_dataset, write_h5
from calibrate.etl import (
    cps,
    cps_health,
    cps_population,
    cps_sample,
    cps_sanity,
    cps_variables,
)

DEFAULT_NAME = paths.DEFAULT_DATASET.name
FIXTURE_NAME = paths.FIXTURE_DATASET.name
DEFAULT_HOUSEHOLDS = 12_000


@dataclass(frozen=True)
class FileSummary:
    """Counts and weighted totals of one built file."""

    path: Path
    households: int
    persons: int
    tax_units: int
    states: int
    weighted_households: float
    weighted_persons: float
    size_bytes: int
    sha256: str


@dataclass
class DatasetReport:
    """What ``build_datasets`` wrote, with sanity figures for the default file."""

    files: dict[str, FileSummary]
    uprating_factors: dict[int, float]
    national: cps_sanity.NationalFigures | None = None
    simulated: cps_sanity.SimulatedFigures | None = None
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = ["Base datasets (policyengine-us h5, period 2024)"]
        for name, s in self.files.items():
            lines.append(
                f"  {name}: {s.households:,} households, {s.persons:,} persons, {s.tax_units:,} tax units, "
                f"{s.states} states; weighted {s.weighted_households / 1e6:,.2f}M households, "
                f"{s.weighted_persons / 1e6:,.2f}M persons; {s.size_bytes / 1e6:.2f} MB"
            )
        factors = ", ".join(f"{y}: {f:.4f}" for y, f in sorted(self.uprating_factors.items()))
        lines.append(f"  uprating to 2024 ({cps_variables.CPI_PARAMETER}): {factors}")
        n, sim = self.national, self.simulated
        default = self.files.get(DEFAULT_NAME)
        if n is not None and default is not None:
            lines.append("  sanity (default file vs published national figures):")
            lines.append(_vs("persons", default.weighted_persons, n.population, "ACS S0101 2024"))
            lines.append(_vs("households", default.weighted_households, n.households, "ACS S2201 2024, sum of CDs"))
        if n is not None and sim is not None:
            lines.append(_vs("SNAP benefits ($)", sim.snap, n.snap_cost, "USDA, annual cost"))
            lines.append(_vs("SNAP households (snap>0)", sim.snap_households, n.snap_households, "USDA, avg monthly households"))
            lines.append(_vs("Medicaid persons (medicaid>0)", sim.medicaid_persons, n.medicaid_enrollment, "CMS enrollment"))
            lines.append(f"    Medicaid spending (PE medicaid): {sim.medicaid / 1e9:,.1f}B")
            lines.append(f"    AGI: {sim.adjusted_gross_income / 1e12:,.2f}T; EITC: {sim.eitc / 1e9:,.1f}B")
        lines += [f"  note: {t}" for t in self.notes]
        return "\n".join(lines)


def _vs(label: str, ours: float, published: float, source: str) -> str:
    return f"    {label}: {ours / 1e6:,.2f}M vs {published / 1e6:,.2f}M ({source}); ratio {ours / published:.3f}"


def cpi_parameter():
    """policyengine-us's CPI-U parameter (a callable of an ISO date)."""
    from calibrate.core import pe

    return pe.tax_benefit_system().parameters.get_child(cps_variables.CPI_PARAMETER)


def summarize(path: Path) -> FileSummary:
    """Counts and weighted totals of a built (or any PE-layout) file."""
    a = read_h5(path, variables=("household_id", "household_weight", "person_household_id", "tax_unit_id", "state_fips"))
    weight_by_id = dict(zip(a["household_id"].tolist(), a["household_weight"].tolist()))
    person_weights = np.array([weight_by_id[h] for h in a["person_household_id"].tolist()])
    return FileSummary(
        path=Path(path),
        households=len(a["household_id"]),
        persons=len(a["person_household_id"]),
        tax_units=len(a["tax_unit_id"]),
        states=len(np.unique(a["state_fips"])),
        weighted_households=float(a["household_weight"].sum()),
        weighted_persons=float(person_weights.sum()),
        size_bytes=Path(path).stat().st_size,
        sha256=file_sha256(path),
    )


def load_population(sources_dir: Path, seed: int, cpi=None) -> tuple[cps_population.Population, dict[int, float]]:
    """Read and check all sources (before any file is written) and build the population."""
    sources_dir = Path(sources_dir)
    df = cps.read_taxcalc_cps(sources_dir / cps.CPS_FILE)
    health = cps_health.read_health_spending(sources_dir / cps_health.HEALTH_FILE)
    factors = cps_variables.uprating_factors(cpi if cpi is not None else cpi_parameter())
    return cps_population.build_population(df, factors, health, seed), factors


def build_datasets(
    sources_dir=paths.SOURCES,
    out_dir=paths.DATASETS,
    seed: int = 0,
    n_households: int = DEFAULT_HOUSEHOLDS,
    simulate: bool = True,
    only_fixture: bool = False,
) -> DatasetReport:
    """Build the fixture and (unless ``only_fixture``) the default file; return the report.

    ``simulate`` runs policyengine-us over the default file for the sanity figures.
    """
    sources_dir, out_dir = Path(sources_dir), Path(out_dir)
    national = cps_sanity.read_national_figures(sources_dir) if simulate else None
    pop, factors = load_population(sources_dir, seed)
    selections = {FIXTURE_NAME: cps_sample.fixture_sample(pop.households, seed)}
    if not only_fixture:
        selections[DEFAULT_NAME] = cps_sample.stratified_sample(pop.households, n_households, seed)
    files = {}
    for name, selection in selections.items():
        path = write_h5(cps_population.subset_arrays(pop, selection), out_dir / name)
        validate_dataset(path)
        files[name] = summarize(path)
    report = DatasetReport(files=files, uprating_factors=factors, national=national)
    if simulate and DEFAULT_NAME in files:
        report.simulated = cps_sanity.simulate_figures(out_dir / DEFAULT_NAME)
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=Path, default=paths.SOURCES)
    parser.add_argument("--out", type=Path, default=paths.DATASETS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--households", type=int, default=DEFAULT_HOUSEHOLDS)
    parser.add_argument("--no-simulate", action="store_true", help="skip the policyengine-us sanity figures")
    parser.add_argument("--fixture-only", action="store_true")
    args = parser.parse_args(argv)
    report = build_datasets(args.sources, args.out, args.seed, args.households, not args.no_simulate, args.fixture_only)
    print(report.format())


if __name__ == "__main__":
    main()
