"""Shared, session-scoped fixtures: policyengine-us is imported once per test session."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

from calibrate.core import paths


@pytest.fixture(scope="session")
def tax_benefit_system():
    from calibrate.core import pe

    return pe.tax_benefit_system()


@pytest.fixture(scope="session")
def fixture_dataset():
    assert paths.FIXTURE_DATASET.is_file(), "run python -m calibrate.etl to build storage/datasets"
    return paths.FIXTURE_DATASET


@pytest.fixture(scope="session")
def target_db():
    assert paths.TARGET_DB.is_file(), "run python -m calibrate.etl to build storage/policy_data.db"
    return paths.TARGET_DB
