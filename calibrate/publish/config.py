"""The publish stage's settings in a run (``conf/publish/``): one typed dataclass, also the Hydra
schema of ``publish`` (``calibrate.app.config`` registers it), so a misspelled option or a wrong
type fails at composition naming the key. ``make_options`` turns it (or the CLI's keyword
arguments) into the resolved :class:`~calibrate.publish.stage.PublishOptions` of one call."""

from __future__ import annotations

from dataclasses import dataclass, field

VERIFY_MODES = ("all", "sample", "none")
DEFAULT_SAMPLE_SIZE = 6
DEFAULT_RTOL = 1e-4


@dataclass
class PublishOptionsConfig:
    """Options of the publish stage (the keys of ``python -m calibrate.publish``, docs/publish.md)."""

    verify: str = "all"  # all | sample | none: which files are re-simulated
    workers: int | None = None  # processes (null: one per CPU core)
    out_dir: str | None = None  # where the datasets go (null: <run_dir>/datasets)
    sample_size: int = DEFAULT_SAMPLE_SIZE  # files re-simulated with verify=sample
    rtol: float = DEFAULT_RTOL  # verification tolerance, relative to sum w |contribution|
    dataset_path: str | None = None  # override the dataset recorded in summary.json
    db_path: str | None = None  # override the target database recorded in summary.json


@dataclass
class PublishConfig:
    """Optional publishing stage (``calibrate.publish.publish_run``), off by default."""

    enabled: bool = False  # run the publish stage after a successful fit
    areas: list[str] = field(default_factory=lambda: ["cd", "state"])  # area levels to publish
    options: PublishOptionsConfig = field(default_factory=PublishOptionsConfig)
