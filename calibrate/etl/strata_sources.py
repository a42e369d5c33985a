"""Turn the parsed sources into a deterministic plan of strata and targets (no database here).

Stratum groups (``stratum_group_id``): 1 geography, 2 age, 3 AGI, 4 SNAP, 5 Medicaid, 6 EITC,
7 national totals, 8 ACS households (composition), 9 SOI national, 10 ACS SNAP / non-SNAP
households, 11 ACS households by age composition. A non-geographic stratum repeats its
geographic constraint and has the geographic stratum as parent. Strata are listed in a fixed sort order, so ids are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from calibrate.targets.geography import FIPS_STATE

from . import census_sources as census
from . import program_sources as programs
from .target_sources import SOURCES, Constraint, Finding, SourceInfo, constraint_value

GROUPS = {1: "geography", 2: "age", 3: "AGI", 4: "SNAP", 5: "Medicaid", 6: "EITC", 7: "national totals",
          8: "ACS households", 9: "SOI national", 10: "ACS SNAP households",
          11: "ACS households by age", 12: "ACS households by poverty status"}
ACS_YEAR = 2024  # ACS 2024 1-year tables
SNAP_FISCAL_YEAR = 2024
MEDICAID_PERIOD = "202412"
IRS_TAX_YEAR = 2022  # eitc_state.csv header; agi_state.csv cross-checked against SOI TY2022 totals
# Source variable names renamed in the installed policyengine-us (2.68 names the reported input
# without the ``_reported`` suffix).
VARIABLE_ALIASES = {"spm_unit_energy_subsidy_reported": "spm_unit_energy_subsidy"}
# policyengine-us parameter under calibration.gov.cbo -> the variable whose national total it is.
CBO_VARIABLES = {
    "income_tax": "income_tax",
    "snap": "snap",
    "social_security": "social_security",
    "ssi": "ssi",
    "unemployment_compensation": "unemployment_compensation",
}
CBO_YEAR = 2024

US = ("us",)


@dataclass(frozen=True)
class StratumSpec:
    key: tuple
    parent: tuple | None
    group: int
    constraints: tuple[Constraint, ...]
    notes: str
    order: tuple  # sort key that fixes the stratum id


@dataclass(frozen=True)
class TargetSpec:
    variable: str
    period: int
    stratum: tuple
    value: float
    source: str
    notes: str
    moe: float | None = None  # published margin of error, same unit as value
    moe_confidence: float | None = None  # its confidence level (ACS: 0.90)


@dataclass
class TargetPlan:
    strata: dict[tuple, StratumSpec] = field(default_factory=dict)
    targets: list[TargetSpec] = field(default_factory=list)
    sources: list[SourceInfo] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    def add_stratum(self, spec: StratumSpec) -> tuple:
        if spec.key in self.strata and self.strata[spec.key] != spec:
            raise ValueError(f"stratum {spec.key} defined twice differently")
        self.strata[spec.key] = spec
        return spec.key

    def add_target(self, variable, period, stratum, value, source, notes="", moe=None, moe_confidence=None) -> None:
        self.targets.append(TargetSpec(variable, int(period), stratum, float(value), source, notes,
                                       None if moe is None else float(moe), moe_confidence if moe is not None else None))

    def ordered_strata(self) -> list[StratumSpec]:
        return sorted(self.strata.values(), key=lambda s: s.order)


def _geo(level: str, code: int) -> tuple:
    return US if level == "national" else (("state", code) if level == "state" else ("cd", code))


def _geo_constraints(geo: tuple) -> tuple[Constraint, ...]:
    if geo == US:
        return ()
    variable = "state_fips" if geo[0] == "state" else "congressional_district_geoid"
    return (Constraint(variable, "==", str(geo[1])),)


LEVEL_RANK = {"us": 0, "state": 1, "cd": 2}


def _sub_stratum(plan: TargetPlan, name: str, geo: tuple, group: int, index, constraints, notes: str,
                 sort_group: int | None = None) -> tuple:
    """A stratum under ``geo`` that repeats its geographic constraint; ``sort_group`` (default ``group``)
    places it in the id order (a group split out of another keeps its old place, so ids stay stable)."""
    code = geo[1] if len(geo) > 1 else 0
    spec = StratumSpec((name, geo, index), geo, group, tuple(sorted(_geo_constraints(geo) + tuple(constraints))),
                       notes, (group if sort_group is None else sort_group, LEVEL_RANK[geo[0]], code, index))
    return plan.add_stratum(spec)


def add_geography(plan: TargetPlan, cds: tuple[int, ...]) -> None:
    plan.add_stratum(StratumSpec(US, None, 1, (), "United States", (1, 0, 0, 0)))
    for fips in sorted(FIPS_STATE):
        plan.add_stratum(StratumSpec(("state", fips), US, 1, _geo_constraints(("state", fips)),
                                     f"State {FIPS_STATE[fips]}", (1, 1, fips, 0)))
    for cd in cds:
        plan.add_stratum(StratumSpec(("cd", cd), ("state", cd // 100), 1, _geo_constraints(("cd", cd)),
                                     f"CD {FIPS_STATE[cd // 100]}-{cd % 100:02d}", (1, 2, cd, 0)))


def _age_constraints(lo: int, hi: int | None) -> tuple[Constraint, ...]:
    upper = (Constraint("age", "<", str(hi)),) if hi is not None else ()
    return (Constraint("age", ">=", str(lo)),) + upper


def add_acs(plan: TargetPlan, s0101: dict[str, dict], s2201: dict, moe: dict | None = None) -> None:
    """Population (group 1) and age bins (group 2) at every level; CD households (1) and SNAP households (4)."""
    skipped = []
    moe = moe or {}
    acs_moe = census.ACS_MOE_CONFIDENCE
    for level, table in s0101.items():
        for code, row in sorted(table.items()):
            geo = _geo(level, code)
            row_moe = moe.get(("s0101", level), {}).get(code, {})
            total = row[census.TOTAL_POPULATION]
            if total is None:
                skipped.append(f"{level} {code} {census.TOTAL_POPULATION}")
            else:
                plan.add_target("person_count", ACS_YEAR, geo, total, "acs_s0101", "ACS S0101_C01_001E total population",
                                row_moe.get(census.TOTAL_POPULATION), acs_moe)
            for i, ((lo, hi), column) in enumerate(zip(census.AGE_BINS, census.AGE_COLUMNS)):
                label = f"age {lo}-{hi - 1}" if hi else f"age {lo}+"
                stratum = _sub_stratum(plan, "age", geo, 2, i, _age_constraints(lo, hi), label)
                if row[column] is None:
                    skipped.append(f"{level} {code} {column}")
                    continue
                plan.add_target("person_count", ACS_YEAR, stratum, row[column], "acs_s0101", f"ACS {column}",
                                row_moe.get(column), acs_moe)
    for cd, row in sorted(s2201.items()):
        row_moe = moe.get(("s2201", "district"), {}).get(cd, {})
        if row[census.ALL_HOUSEHOLDS] is None:
            skipped.append(f"district {cd} {census.ALL_HOUSEHOLDS}")
        else:
            plan.add_target("household_count", ACS_YEAR, ("cd", cd), row[census.ALL_HOUSEHOLDS], "acs_s2201",
                            "ACS S2201_C01_001E households", row_moe.get(census.ALL_HOUSEHOLDS), acs_moe)
        stratum = _sub_stratum(plan, "snap", ("cd", cd), 4, 0, (Constraint("snap", ">", "0"),), "SNAP households")
        if row[census.SNAP_HOUSEHOLDS] is None:
            skipped.append(f"district {cd} {census.SNAP_HOUSEHOLDS}")
            continue
        plan.add_target("household_count", ACS_YEAR, stratum, row[census.SNAP_HOUSEHOLDS], "acs_s2201",
                        "ACS S2201_C03_001E households receiving SNAP in the past 12 months",
                        row_moe.get(census.SNAP_HOUSEHOLDS), acs_moe)
    if skipped:
        plan.findings.append(Finding("acs", f"{len(skipped)} ACS estimates not published, no target: {skipped[:20]}"))


def add_snap_states(plan: TargetPlan, usda: dict[int, programs.SnapState]) -> None:
    for fips, snap in sorted(usda.items()):
        stratum = _sub_stratum(plan, "snap", ("state", fips), 4, 0, (Constraint("snap", ">", "0"),), "SNAP households")
        note = f"USDA FNS FY{SNAP_FISCAL_YEAR}"
        plan.add_target("household_count", SNAP_FISCAL_YEAR, stratum, snap.households, "usda_snap",
                        f"{note} average monthly participating households")
        plan.add_target("snap", SNAP_FISCAL_YEAR, stratum, snap.cost, "usda_snap", f"{note} annual benefit cost, dollars")


def add_medicaid(plan: TargetPlan, enrollment: dict[int, programs.MedicaidEnrollment]) -> None:
    for fips, row in sorted(enrollment.items()):
        stratum = _sub_stratum(plan, "medicaid", ("state", fips), 5, 0, (Constraint("medicaid", ">", "0"),),
                               "Medicaid enrollees")
        plan.add_target("person_count", int(row.reporting_period[:4]), stratum, row.enrollment, "cms_medicaid",
                        f"CMS Total Medicaid Enrollment, updated report {row.reporting_period}")


def _agi_constraints(lo: float, hi: float) -> tuple[Constraint, ...]:
    out = []
    if not math.isinf(lo):
        out.append(Constraint("adjusted_gross_income", ">=", constraint_value(lo)))
    if not math.isinf(hi):
        out.append(Constraint("adjusted_gross_income", "<", constraint_value(hi)))
    return tuple(out)


def add_agi(plan: TargetPlan, cells: list[programs.AgiCell]) -> None:
    for fips in sorted({c.state_fips for c in cells}):
        brackets = sorted((c for c in cells if c.state_fips == fips), key=lambda c: c.lower)
        for i, c in enumerate(brackets):
            label = f"AGI [{c.lower:,.0f}, {c.upper:,.0f})"
            stratum = _sub_stratum(plan, "agi", ("state", fips), 3, i, _agi_constraints(c.lower, c.upper), label)
            plan.add_target("tax_unit_count", IRS_TAX_YEAR, stratum, c.returns, "irs_agi_state",
                            f"IRS SOI returns filed, TY{IRS_TAX_YEAR} (filers only)")
            plan.add_target("adjusted_gross_income", IRS_TAX_YEAR, stratum, c.agi, "irs_agi_state",
                            f"IRS SOI AGI, dollars, TY{IRS_TAX_YEAR}")


def add_eitc(plan: TargetPlan, eitc: dict[int, programs.EitcState]) -> None:
    for fips, row in sorted(eitc.items()):
        stratum = _sub_stratum(plan, "eitc", ("state", fips), 6, 0, (Constraint("eitc", ">", "0"),), "EITC recipients")
        plan.add_target("tax_unit_count", IRS_TAX_YEAR, stratum, row.returns, "irs_eitc_state",
                        f"IRS SOI EITC returns, TY{IRS_TAX_YEAR}")
        plan.add_target("eitc", IRS_TAX_YEAR, stratum, row.amount, "irs_eitc_state",
                        f"IRS SOI EITC amount, dollars, TY{IRS_TAX_YEAR}")


def _alias(name: str, plan: TargetPlan) -> str:
    if name in VARIABLE_ALIASES:
        plan.findings.append(Finding("aliases", f"source variable {name} stored as {VARIABLE_ALIASES[name]}"))
    return VARIABLE_ALIASES.get(name, name)


def national_sources(rows: list[programs.NationalRow]) -> list[SourceInfo]:
    by_name: dict[str, set[int]] = {}
    for r in rows:
        by_name.setdefault(r.source, set()).add(r.year)
    return [SourceInfo(f"national:{name}", name, "published", None, ", ".join(map(str, sorted(years))),
                       "national/national_targets.csv") for name, years in sorted(by_name.items())]


def add_national(plan: TargetPlan, rows: list[programs.NationalRow], cbo: dict[str, float], pe_version: str) -> None:
    """Group 7: national_targets.csv (sum rows on a constraint-free stratum under US) and CBO totals."""
    totals = _sub_stratum(plan, "national", US, 7, (), (), "national totals")
    for r in rows:
        stratum = totals
        if r.constraint is not None:
            c = Constraint(_alias(r.constraint.variable, plan), r.constraint.operation, r.constraint.value)
            stratum = _sub_stratum(plan, "national", US, 7, (c.line,), (c,), f"national count {c.line}")
        plan.add_target(_alias(r.variable, plan), r.year, stratum, r.value, f"national:{r.source}",
                        f"{r.kind}: {r.notes}")
    for parameter, variable in sorted(CBO_VARIABLES.items()):
        plan.add_target(variable, CBO_YEAR, totals, cbo[parameter], "cbo",
                        f"policyengine-us parameter calibration.gov.cbo.{parameter} at {CBO_YEAR}")
    plan.sources.extend(national_sources(rows))
    plan.sources.append(SourceInfo(
        "cbo", "CBO budget projections (policyengine-us parameters calibration.gov.cbo)", "projection",
        "https://www.cbo.gov/data/budget-economic-data", f"policyengine-us {pe_version}",
        "; ".join(f"{p} -> {v}" for p, v in sorted(CBO_VARIABLES.items()))))


def cross_checks(usda, usda_tidy, medicaid, medicaid_tidy, s0101_state, age_tidy, agi_cells, soi_totals) -> list[Finding]:
    """Compare primary figures with the tidied copies and national totals (reported, never fatal)."""
    out = []
    snap_diffs = [f"{FIPS_STATE[f]} households {usda[f].households:,.2f} vs {usda_tidy[f].households:,.2f}, "
                  f"cost {usda[f].cost:,.0f} vs {usda_tidy[f].cost:,.0f}"
                  for f in sorted(usda) if (usda[f].households, usda[f].cost) != (usda_tidy[f].households, usda_tidy[f].cost)]
    out.append(Finding("snap", "USDA workbook FY24 Total rows vs usda/snap_state.csv: "
                       + ("identical for all 51 states" if not snap_diffs else "; ".join(snap_diffs))))
    ratios = {f: medicaid[f].enrollment / medicaid_tidy[f] for f in sorted(medicaid) if medicaid_tidy[f]}
    differ = [f for f, r in ratios.items() if r != 1.0]
    largest = sorted(differ, key=lambda f: -abs(ratios[f] - 1))[:5]
    out.append(Finding("medicaid", f"CMS raw (updated report {MEDICAID_PERIOD}) vs cms/medicaid_enrollment_2024.csv "
                       f"(preliminary report): {len(differ)} of 51 states differ, ratio "
                       f"{min(ratios.values()):.4f}-{max(ratios.values()):.4f}; largest: "
                       + ", ".join(f"{FIPS_STATE[f]} {medicaid[f].enrollment:,.0f} vs {medicaid_tidy[f]:,.0f}"
                                   for f in largest)))
    rel = [abs(age_tidy[f][i] - s0101_state[f][c]) / s0101_state[f][c]
           for f in age_tidy for i, c in enumerate(census.AGE_COLUMNS) if s0101_state[f][c]]
    absent = sorted(FIPS_STATE[f] for f in set(FIPS_STATE) - set(age_tidy))
    out.append(Finding("age", f"census/age_state.csv vs ACS 2024 S0101 state bins: max relative difference "
                       f"{max(rel):.2%} (another vintage; not used), states absent: {absent}"))
    returns = sum(c.returns for c in agi_cells)
    agi = sum(c.agi for c in agi_cells)
    out.append(Finding("agi", f"agi_state.csv summed over states / SOI Table 1.1 TY{IRS_TAX_YEAR} national: "
                       f"returns {returns / soi_totals[0]:.4f}, AGI {agi / soi_totals[1]:.4f}"))
    return out


@dataclass(frozen=True)
class SourceData:
    cds: tuple[int, ...]
    s0101: dict
    s2201: dict
    usda: dict
    medicaid: dict
    agi: list
    eitc: dict
    national: list
    findings: list[Finding]
    acs_moe: dict = field(default_factory=dict)  # (table, level) -> {geo: {E column: MOE or None}}
    soi: list = field(default_factory=list)  # soi_sources.SoiCell


def read_sources(sources_dir: Path) -> SourceData:
    """Parse every source file (cheap; raises ``SourceError`` before any expensive work)."""
    d = Path(sources_dir)
    cds = census.read_cd_list(d / "census/acs5_congressional_districts_2024.json")
    s0101_columns = (census.TOTAL_POPULATION,) + census.AGE_COLUMNS
    from . import acs_households, soi_sources

    s0101, acs_moe = {}, {}
    for level in ("national", "state", "district"):
        path = d / f"census/acs_S0101_{level}_2024.json"
        s0101[level] = census.read_acs(path, level, s0101_columns)
        acs_moe[("s0101", level)] = census.read_acs_moe(path, level, s0101_columns)
    census.check_same_cds(s0101["district"], cds, d / "census/acs_S0101_district_2024.json")
    s2201_path = d / "census/acs_S2201_district_2024.json"
    s2201_columns = (census.ALL_HOUSEHOLDS, census.SNAP_HOUSEHOLDS) + acs_households.household_columns()
    s2201 = census.read_acs(s2201_path, "district", s2201_columns)
    acs_moe[("s2201", "district")] = census.read_acs_moe(s2201_path, "district", s2201_columns)
    census.check_same_cds(s2201, cds, s2201_path)
    usda = programs.read_usda_snap_workbook(d / "usda/snap_fy69tocurrent.zip", SNAP_FISCAL_YEAR)
    medicaid, med_findings = programs.read_medicaid_raw(d / "cms/medicaid_enrollment_2024_raw.csv", MEDICAID_PERIOD)
    agi, agi_findings = programs.read_agi_state(d / "irs/agi_state.csv")
    eitc, eitc_findings = programs.read_eitc_state(d / "irs/eitc_state.csv")
    national = programs.read_national_targets(d / "national/national_targets.csv")
    checks = cross_checks(
        usda, programs.read_snap_state_csv(d / "usda/snap_state.csv"),
        medicaid, programs.read_medicaid_tidy(d / "cms/medicaid_enrollment_2024.csv"),
        s0101["state"], census.read_age_state_csv(d / "census/age_state.csv"),
        agi, programs.read_soi_national_totals(d / "irs/soi_targets.csv", IRS_TAX_YEAR),
    )
    soi, soi_findings = soi_sources.read_soi_national(d / "irs/soi_targets.csv", soi_sources.SOI_YEAR)
    return SourceData(cds, s0101, s2201, usda, medicaid, agi, eitc, national,
                      med_findings + agi_findings + eitc_findings + checks + soi_findings, acs_moe, soi)


def build_plan(data: SourceData, cbo: dict[str, float], pe_version: str) -> TargetPlan:
    """Every stratum and target, in a fixed order, with the source rows they cite."""
    plan = TargetPlan(sources=list(SOURCES), findings=list(data.findings))
    add_geography(plan, data.cds)
    from . import acs_households, soi_sources

    add_acs(plan, data.s0101, data.s2201, data.acs_moe)
    skipped = acs_households.add_households(plan, data.s2201, data.acs_moe.get(("s2201", "district"), {}), ACS_YEAR,
                                            _sub_stratum)
    if skipped:
        plan.findings.append(Finding("acs", f"{len(skipped)} S2201 household-composition cells suppressed "
                                     f"(-999999999 / -888888888 etc.), no target: {skipped[:20]}"))
    add_agi(plan, data.agi)
    add_snap_states(plan, data.usda)
    add_medicaid(plan, data.medicaid)
    add_eitc(plan, data.eitc)
    add_national(plan, data.national, cbo, pe_version)
    soi_sources.add_soi(plan, data.soi, _sub_stratum, US)
    return plan
