"""``python -m calibrate.etl check``: the checks a run makes, as a report on a target database and
datasets someone edited by hand (exit 0 when clean, 2 on problems).

Runs every row through :mod:`calibrate.targets.validate` (not only a run's selection) and
:func:`calibrate.core.dataset.dataset_problems`; then, unless ``--no-variables``, imports
policyengine-us to check that every target and constraint variable exists and that every
constraint value parses as its variable's type.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from calibrate.core.dataset import DATASET_PERIOD, dataset_problems, read_h5
from calibrate.targets import connect
from calibrate.targets.validate import Problem, open_problems, row_problems, value_problems

SHOWN = 10  # problems listed per section; the rest are counted


@dataclass
class Section:
    """One checked file: what was found, as report lines."""

    title: str
    ok: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [self.title] + [f"  ok       {line}" for line in self.ok]
        out += [f"  warning  {line}" for line in self.warnings]
        out += [f"  PROBLEM  {line}" for line in self.problems[:SHOWN]]
        if len(self.problems) > SHOWN:
            out.append(f"  PROBLEM  ... and {len(self.problems) - SHOWN} more")
        return out


def database_section(db_path: Path, variables: bool) -> Section:
    """Report on a target database: file and schema, rows, values, and (optionally) variables."""
    section = Section(f"target database {db_path}")
    opened = open_problems(db_path)
    if opened:
        section.problems += [str(p) for p in opened]
        return section
    section.ok.append("opens; SQLite integrity check; tables and columns the code reads")
    with connect(db_path) as con:
        targets = pd.read_sql_query("SELECT target_id, variable, stratum_id, value FROM targets ORDER BY target_id", con)
        constraints = pd.read_sql_query("SELECT DISTINCT stratum_id, constraint_variable, operation, value "
                                        "FROM stratum_constraints ORDER BY stratum_id", con)
        n_strata = con.execute("SELECT COUNT(*) FROM strata").fetchone()[0]
    rows = row_problems(db_path)
    values = value_problems(targets)
    section.problems += [str(p) for p in rows + values]
    if not rows:
        section.ok.append(f"{len(targets):,} targets, {n_strata:,} strata, {len(constraints):,} constraints: types, "
                          "references, operations, numbers, geography (each CD inside its state)")
    section.ok += _negative_summary(targets)
    if variables and not rows:
        found = variable_problems(targets, constraints)
        section.problems += [str(p) for p in found]
        if not found:
            section.ok.append(f"{targets.variable.nunique()} target variables and "
                              f"{constraints.constraint_variable.nunique()} constraint variables are policyengine-us "
                              "variables; every constraint value parses as its variable's type")
    return section


def _negative_summary(targets: pd.DataFrame) -> list[str]:
    """A line naming the negative totals (legitimate for variables such as AGI), if any."""
    values = pd.to_numeric(targets.value, errors="coerce")
    negative = targets[values < 0]
    if negative.empty:
        return []
    by_variable = ", ".join(f"{v} ({n})" for v, n in Counter(negative.variable).most_common())
    return [f"{len(negative)} targets are negative totals ({by_variable}); they are fitted like any other, and a "
            "run's consistency analysis flags one its households cannot reach (consistency.csv)"]


def variable_problems(targets: pd.DataFrame, constraints: pd.DataFrame) -> list[Problem]:
    """Unknown target/constraint variables and constraint values not of their variable's type
    (imports policyengine-us; no simulation)."""
    from calibrate.core import pe
    from calibrate.matrix.contributions import ConstraintError, parse_constraint_value

    out = []
    for name, rows in targets.groupby("variable", sort=True):
        if pe.target_variable(name) is None:
            ids = rows.target_id.tolist()
            out.append(Problem(f"targets: target_id {ids[0]}", f"variable {name!r} is not a policyengine-us "
                                                               f"variable ({len(ids)} targets use it)"))
    for c in constraints.itertuples(index=False):
        try:
            parse_constraint_value(c.constraint_variable, c.operation, c.value)
        except ConstraintError as exc:
            out.append(Problem(f"stratum_constraints: stratum_id {c.stratum_id}", str(exc)))
    return out


def dataset_section(path: Path, period: int, variables: bool) -> Section:
    """Report on one dataset file: opens, required variables, entity links, (optionally) variable names."""
    section = Section(f"dataset {path}")
    problems = dataset_problems(path, period=period)
    if problems:
        section.problems += problems
        return section
    ids = read_h5(path, period, ["person_id", "household_id"])
    section.ok.append(f"opens and reads in full; required variables for {period}; entity links "
                      f"({len(ids['person_id']):,} persons, {len(ids['household_id']):,} households)")
    if variables:
        from calibrate.core import pe

        unknown = [name for name in read_h5(path, period) if pe.variable(name) is None]
        if unknown:
            section.warnings.append(f"{len(unknown)} variables are not policyengine-us variables and are ignored "
                                    f"by simulations: {', '.join(unknown[:5])}")
    return section


def check(db_path: Path | None, dataset_paths: list[Path], period: int = DATASET_PERIOD,
          variables: bool = True) -> tuple[str, int]:
    """(report text, number of problems) for a database and datasets."""
    sections = ([database_section(Path(db_path), variables)] if db_path else []) + [
        dataset_section(Path(p), period, variables) for p in dataset_paths
    ]
    n_problems = sum(len(s.problems) for s in sections)
    n_warnings = sum(len(s.warnings) for s in sections)
    lines = [line for s in sections for line in s.lines()]
    lines.append(f"{'clean' if not n_problems else 'PROBLEMS FOUND'}: {n_problems} problems, {n_warnings} warnings")
    return "\n".join(lines), n_problems
