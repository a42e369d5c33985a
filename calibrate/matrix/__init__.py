"""Stage 2, matrix: the geo-stacked calibration matrix X (n_targets, one column per household per CD).

Takes the base dataset (``conf/dataset/``), the CD list (``conf/geo/``) and the selected
targets; gives a :class:`CalibrationMatrix` (targets, CSR X, and the :class:`StackedLayout` of its
columns: CDs, their states, households, column <-> (CD, household); ``layout`` is the one place that
knows the column formula). ``contributions`` defines what a
household contributes to a target, ``stacking`` replicates households so several states
share one simulation, ``simulate`` runs those simulations, ``executors`` runs them in
local processes or on Dask (``conf/executor/``), ``cache`` keeps one household vector per
(state, template) on disk, ``assembly`` builds X from those, ``tracer`` explains rows,
columns and cells.
"""

from calibrate.matrix.assembly import assemble
from calibrate.matrix.build import CalibrationMatrix, build_matrix, cache_key, row_templates, state_contributions
from calibrate.matrix.cache import CacheEntryWarning
from calibrate.matrix.executors import ExecutorSettings
from calibrate.matrix.layout import StackedLayout

__all__ = [
    "CacheEntryWarning", "CalibrationMatrix", "ExecutorSettings", "StackedLayout", "assemble", "build_matrix",
    "cache_key", "row_templates", "state_contributions",
]
