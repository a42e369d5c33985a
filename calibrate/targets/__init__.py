"""Stage 1, targets: select published statistics from the SQLite target database.

Takes the database path, a :class:`TargetFilter` (from ``conf/target/``) and the CD list
(from ``conf/geo/``); gives a targets frame, one row per target with its value,
geographic level and non-geographic constraints. ``geography`` knows the 51 states and
436 CDs.
"""

from calibrate.targets.selection import (
    GEO_LEVELS,
    GEO_VARIABLES,
    OPERATIONS,
    Constraint,
    TargetFilter,
    TargetSelectionError,
    all_cds,
    connect,
    load_targets,
)

__all__ = [
    "GEO_LEVELS", "GEO_VARIABLES", "OPERATIONS", "Constraint", "TargetFilter", "TargetSelectionError",
    "all_cds", "connect", "load_targets",
]
