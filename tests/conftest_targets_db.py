"""Fixtures for the target-database tests: a cheap, independent stand-in for policyengine-us facts.

Importing policyengine-us takes about a minute; these facts read its files directly instead
(variable class names from the source tree, CBO values from the parameter YAML), so most tests
run in seconds. One test still runs the real policyengine-us validation.
"""

from __future__ import annotations

import datetime
import importlib.util
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from calibrate.etl.targets_db import ModelFacts, build_target_db


def policyengine_us_dir() -> Path:
    spec = importlib.util.find_spec("policyengine_us")  # locates the package without importing it
    return Path(next(iter(spec.submodule_search_locations)))


def variable_names_from_source() -> frozenset[str]:
    """Names of every ``class name(Variable)`` in the policyengine-us source tree."""
    pattern = re.compile(r"^class (\w+)\(Variable\)", re.MULTILINE)
    return frozenset(
        name for path in (policyengine_us_dir() / "variables").rglob("*.py") for name in pattern.findall(path.read_text())
    )


def cbo_value_from_yaml(parameter: str, year: int) -> float:
    """The value in force on 1 January ``year`` in ``calibration/gov/cbo/<parameter>.yaml``."""
    path = policyengine_us_dir() / "parameters/calibration/gov/cbo" / f"{parameter}.yaml"
    values = yaml.safe_load(path.read_text())["values"]
    dates = {(d if isinstance(d, datetime.date) else datetime.date.fromisoformat(str(d))): v for d, v in values.items()}
    in_force = max(d for d in dates if d <= datetime.date(year, 1, 1))
    return float(dates[in_force])


def static_facts(has_variable=None) -> ModelFacts:
    from calibrate.core.derived import DERIVED

    names = variable_names_from_source() | frozenset(DERIVED)
    return ModelFacts(has_variable or names.__contains__, cbo_value_from_yaml, version("policyengine-us"))


@pytest.fixture(scope="session")
def cheap_facts() -> ModelFacts:
    return static_facts()


@pytest.fixture(scope="session")
def rebuilt_db(tmp_path_factory, cheap_facts):
    """A fresh build from storage/sources into a temp path, with its report."""
    out = tmp_path_factory.mktemp("targets_db") / "policy_data.db"
    report = build_target_db(out_path=out, facts=cheap_facts)
    return out, report
