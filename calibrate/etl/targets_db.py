"""Build the SQLite target database ``storage/policy_data.db`` from ``storage/sources``.

``python -m calibrate.etl.targets_db`` rebuilds it and prints the build report. The layout
(tables ``sources``, ``strata``, ``stratum_constraints``, ``targets``) and every stratum group
are documented in ``docs/targets.md``. The build parses every source first (cheap, raising
``SourceError`` on bad input), then asks policyengine-us for the CBO totals and checks every
variable name, and only then writes: to a temporary file beside the output, moved into place
with ``os.replace`` so a failed build leaves nothing behind.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from calibrate.core import paths
from calibrate.targets.geography import FIPS_STATE

from .strata_sources import CBO_VARIABLES, CBO_YEAR, GROUPS, TargetPlan, build_plan, read_sources
from .target_sources import OPERATIONS, Constraint, Finding, SourceError

__all__ = [
    "ModelFacts", "SourceError", "TargetDbError", "TargetDbReport", "build_target_db", "definition_hash",
    "policyengine_facts", "SCHEMA",
]


class TargetDbError(ValueError):
    """The planned database breaks a rule (unknown variable, wrong parent, duplicate target)."""


@dataclass(frozen=True)
class ModelFacts:
    """What the build needs from policyengine-us, injectable so tests can avoid the slow import."""

    has_variable: Callable[[str], bool]
    cbo_value: Callable[[str, int], float]  # parameter under calibration.gov.cbo, year -> value
    version: str  # policyengine-us version, recorded in the CBO source row


def policyengine_facts() -> ModelFacts:
    """The real facts, read from the installed policyengine-us (imported once, lazily)."""
    from calibrate.core import pe

    def cbo_value(parameter: str, year: int) -> float:
        cbo = pe.tax_benefit_system().parameters.calibration.gov.cbo
        return float(getattr(cbo, parameter)(f"{year}-01-01"))

    return ModelFacts(lambda name: pe.target_variable(name) is not None, cbo_value,
                      pe.package_versions()["policyengine-us"])


def definition_hash(parent_id: int | None, constraints: Iterable[Constraint | tuple[str, str, str]]) -> str:
    """``sha256("\\n".join([str(parent_id or "")] + sorted("variable|operation|value" lines)))`` as hex."""
    lines = sorted(f"{v}|{op}|{val}" for v, op, val in constraints)
    return hashlib.sha256("\n".join([str(parent_id or "")] + lines).encode()).hexdigest()


_OPS_SQL = ", ".join(f"'{op}'" for op in OPERATIONS)
SCHEMA = f"""
CREATE TABLE sources (
    source_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    type TEXT NOT NULL,
    url TEXT,
    vintage TEXT,
    notes TEXT
);
CREATE TABLE strata (
    stratum_id INTEGER PRIMARY KEY,
    definition_hash TEXT NOT NULL UNIQUE,
    parent_stratum_id INTEGER REFERENCES strata(stratum_id),
    stratum_group_id INTEGER NOT NULL,
    notes TEXT
);
CREATE TABLE stratum_constraints (
    stratum_id INTEGER NOT NULL REFERENCES strata(stratum_id),
    constraint_variable TEXT NOT NULL,
    operation TEXT NOT NULL CHECK (operation IN ({_OPS_SQL})),
    value TEXT NOT NULL,
    notes TEXT,
    PRIMARY KEY (stratum_id, constraint_variable, operation)
);
CREATE TABLE targets (
    target_id INTEGER PRIMARY KEY,
    variable TEXT NOT NULL,
    period INTEGER NOT NULL,
    stratum_id INTEGER NOT NULL REFERENCES strata(stratum_id),
    reform_id INTEGER NOT NULL DEFAULT 0,
    value REAL NOT NULL,
    source_id INTEGER REFERENCES sources(source_id),
    active INTEGER NOT NULL DEFAULT 1 CHECK (active IN (0, 1)),
    tolerance REAL,
    notes TEXT,
    moe REAL CHECK (moe IS NULL OR moe >= 0),
    moe_confidence REAL CHECK (moe_confidence IS NULL OR (moe_confidence > 0 AND moe_confidence < 1)),
    UNIQUE (variable, period, stratum_id, reform_id)
);
CREATE INDEX idx_constraints_variable ON stratum_constraints(constraint_variable, value);
CREATE INDEX idx_targets_stratum ON targets(stratum_id);
CREATE INDEX idx_strata_group ON strata(stratum_group_id);
"""


@dataclass(frozen=True)
class TableRows:
    """The four tables as row tuples, ids assigned in the plan's fixed order."""

    sources: list[tuple]
    strata: list[tuple]
    constraints: list[tuple]
    targets: list[tuple]
    stratum_ids: dict[tuple, int]


def validate_plan(plan: TargetPlan, has_variable: Callable[[str], bool]) -> None:
    """Every variable is a policyengine-us variable; parents exist and CDs sit under their state."""
    used: dict[str, str] = {}
    for t in plan.targets:
        used.setdefault(t.variable, f"target variable ({t.source})")
    for s in plan.strata.values():
        for c in s.constraints:
            used.setdefault(c.variable, f"constraint of stratum {s.notes!r}")
    unknown = [f"{name} ({where})" for name, where in sorted(used.items()) if not has_variable(name)]
    if unknown:
        raise TargetDbError(f"not policyengine-us variables: {', '.join(unknown)}")
    for s in plan.strata.values():
        if s.parent is not None and s.parent not in plan.strata:
            raise TargetDbError(f"stratum {s.key} has unknown parent {s.parent}")
        if s.key[0] == "cd" and s.parent != ("state", s.key[1] // 100):
            raise TargetDbError(f"CD {s.key[1]} has parent {s.parent}, not its state")
    seen = set()
    for t in plan.targets:
        key = (t.variable, t.period, t.stratum)
        if t.stratum not in plan.strata:
            raise TargetDbError(f"target {t.variable} refers to unknown stratum {t.stratum}")
        if key in seen:
            raise TargetDbError(f"duplicate target {t.variable} {t.period} on stratum {t.stratum}")
        seen.add(key)
    source_keys = [s.key for s in plan.sources]
    if len(set(source_keys)) != len(source_keys):
        raise TargetDbError("duplicate source keys")
    missing = sorted({t.source for t in plan.targets} - set(source_keys))
    if missing:
        raise TargetDbError(f"targets cite unknown sources {missing}")


def table_rows(plan: TargetPlan) -> TableRows:
    """Assign ids (sources in catalog order, strata in sort order, targets by stratum/variable/period)."""
    source_ids = {s.key: i for i, s in enumerate(plan.sources, start=1)}
    sources = [(source_ids[s.key], s.name, s.type, s.url, s.vintage, s.notes) for s in plan.sources]
    stratum_ids: dict[tuple, int] = {}
    strata, constraints, hashes = [], [], set()
    for i, s in enumerate(plan.ordered_strata(), start=1):
        stratum_ids[s.key] = i
        parent_id = stratum_ids[s.parent] if s.parent is not None else None
        digest = definition_hash(parent_id, s.constraints)
        if digest in hashes:
            raise TargetDbError(f"stratum {s.key} duplicates another stratum's definition")
        hashes.add(digest)
        strata.append((i, digest, parent_id, s.group, s.notes))
        constraints.extend((i, c.variable, c.operation, c.value, None) for c in sorted(s.constraints))
    ordered = sorted(plan.targets, key=lambda t: (stratum_ids[t.stratum], t.variable, t.period))
    targets = [(i, t.variable, t.period, stratum_ids[t.stratum], 0, t.value, source_ids[t.source], 1, None, t.notes,
                t.moe, t.moe_confidence) for i, t in enumerate(ordered, start=1)]
    return TableRows(sources, strata, constraints, targets, stratum_ids)


def write_db(rows: TableRows, out_path: Path) -> None:
    """Write the tables to a temp file beside ``out_path``, then move it into place atomically."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        con = sqlite3.connect(tmp)
        try:
            con.execute("PRAGMA foreign_keys = ON")
            con.executescript(SCHEMA)
            con.executemany("INSERT INTO sources VALUES (?, ?, ?, ?, ?, ?)", rows.sources)
            con.executemany("INSERT INTO strata VALUES (?, ?, ?, ?, ?)", rows.strata)
            con.executemany("INSERT INTO stratum_constraints VALUES (?, ?, ?, ?, ?)", rows.constraints)
            con.executemany("INSERT INTO targets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows.targets)
            con.commit()
        finally:
            con.close()
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def build_target_db(
    sources_dir: Path = paths.SOURCES, out_path: Path = paths.TARGET_DB, *, facts: ModelFacts | None = None
) -> TargetDbReport:
    """Rebuild the target database from ``sources_dir`` into ``out_path`` and report on it."""
    data = read_sources(Path(sources_dir))
    facts = facts or policyengine_facts()
    cbo = {parameter: facts.cbo_value(parameter, CBO_YEAR) for parameter in sorted(CBO_VARIABLES)}
    plan = build_plan(data, cbo, facts.version)
    validate_plan(plan, facts.has_variable)
    rows = table_rows(plan)
    write_db(rows, Path(out_path))
    return make_report(plan, rows.stratum_ids, Path(out_path))


# --- build report ------------------------------------------------------------------------------

LEVELS = {"us": "national", "state": "state", "cd": "district"}


@dataclass(frozen=True)
class CdStateComparison:
    """Sum of a state's CD targets against the state target of the same kind (reported only)."""

    state_fips: int
    kind: str
    state_value: float
    cd_sum: float

    @property
    def ratio(self) -> float:
        return self.cd_sum / self.state_value if self.state_value else float("nan")


@dataclass(frozen=True)
class TargetDbReport:
    out_path: Path
    n_sources: int
    n_strata: int
    n_targets: int
    by_group: dict[str, tuple[int, int]]  # group name -> (strata, targets)
    by_geo_level: dict[str, int]  # national/state/district -> targets
    comparisons: tuple[CdStateComparison, ...]
    findings: tuple[Finding, ...]

    def ratios(self, kind: str) -> dict[int, float]:
        return {c.state_fips: c.ratio for c in self.comparisons if c.kind == kind}

    def format(self) -> str:
        lines = [f"target database {self.out_path}: {self.n_sources} sources, {self.n_strata} strata, "
                 f"{self.n_targets} targets", "", f"{'group':<18}{'strata':>8}{'targets':>9}"]
        lines += [f"{name:<18}{ns:>8}{nt:>9}" for name, (ns, nt) in self.by_group.items()]
        lines += ["", "targets by level: " + ", ".join(f"{k} {v}" for k, v in self.by_geo_level.items()), ""]
        lines.append("sum of CD targets / state target (age: min-max over the 18 bins):")
        lines.append(f"{'state':<6}{'population':>11}{'age bins':>16}{'SNAP hh':>9}")
        for fips in sorted(FIPS_STATE):
            pop = self.ratios("population person_count").get(fips, float("nan"))
            ages = [c.ratio for c in self.comparisons if c.state_fips == fips and c.kind.startswith("age ")]
            snap = self.ratios("SNAP households household_count").get(fips, float("nan"))
            age_text = f"{min(ages):.4f}-{max(ages):.4f}" if ages else "n/a"
            lines.append(f"{FIPS_STATE[fips]:<6}{pop:>11.4f}{age_text:>16}{snap:>9.3f}")
        lines += ["", "findings:"] + [f"- [{f.topic}] {f.message}" for f in self.findings]
        return "\n".join(lines)


def _geo_of(key: tuple) -> tuple:
    """(geo key, kind key) of a stratum key: geography strata are their own geo."""
    if key[0] in LEVELS:
        return key, ("geography",)
    return key[1], (key[0], key[2])


def cd_state_comparisons(plan: TargetPlan) -> tuple[CdStateComparison, ...]:
    """For every target kind present on CDs and their state, compare the CD sum with the state value."""
    state_values, cd_sums = {}, {}
    for t in plan.targets:
        geo, kind = _geo_of(t.stratum)
        label = f"{'population' if kind == ('geography',) else plan.strata[t.stratum].notes} {t.variable}"
        if geo[0] == "state":
            state_values[(geo[1], kind, label)] = t.value
        elif geo[0] == "cd":
            k = (geo[1] // 100, kind, label)
            cd_sums[k] = cd_sums.get(k, 0.0) + t.value
    return tuple(CdStateComparison(fips, label, state_values[(fips, kind, label)], total)
                 for (fips, kind, label), total in sorted(cd_sums.items()) if (fips, kind, label) in state_values)


def make_report(plan: TargetPlan, stratum_ids: dict[tuple, int], out_path: Path) -> TargetDbReport:
    by_group = {}
    for group, name in GROUPS.items():
        strata = [s for s in plan.strata.values() if s.group == group]
        keys = {s.key for s in strata}
        by_group[name] = (len(strata), sum(t.stratum in keys for t in plan.targets))
    by_level = {name: 0 for name in LEVELS.values()}
    for t in plan.targets:
        by_level[LEVELS[_geo_of(t.stratum)[0][0]]] += 1
    findings = tuple(dict.fromkeys(plan.findings))  # unique, first-seen order
    return TargetDbReport(out_path, len(plan.sources), len(stratum_ids), len(plan.targets), by_group, by_level,
                          cd_state_comparisons(plan), findings)


def main(argv: list[str] | None = None) -> TargetDbReport:
    parser = argparse.ArgumentParser(description="Rebuild the target database and print the build report.")
    parser.add_argument("--sources", type=Path, default=paths.SOURCES)
    parser.add_argument("--out", type=Path, default=paths.TARGET_DB)
    args = parser.parse_args(argv)
    report = build_target_db(args.sources, args.out)
    print(report.format())
    return report


if __name__ == "__main__":
    main()
