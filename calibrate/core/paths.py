"""Where the embedded data lives. Everything the tool reads at run time is under ``storage/``."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
STORAGE = REPO_ROOT / "storage"
SOURCES = STORAGE / "sources"
TARGET_DB = STORAGE / "policy_data.db"
DATASETS = STORAGE / "datasets"
DEFAULT_DATASET = DATASETS / "cps_2024_stratified.h5"
FIXTURE_DATASET = DATASETS / "cps_2024_fixture.h5"
CACHE = STORAGE / "cache"
