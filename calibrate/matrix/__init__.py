"""Stage 2, matrix: the geo-stacked calibration matrix X (n_targets, n_households * n_cds).

Takes the base dataset (``conf/dataset/``), the CD list (``conf/geo/``) and the selected
targets; gives a :class:`CalibrationMatrix` (targets, CSR X with column
``cd_idx * n_households + hh_idx``, household layout). ``contributions`` defines what a
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

__all__ = [
    "CacheEntryWarning", "CalibrationMatrix", "ExecutorSettings", "assemble", "build_matrix", "cache_key",
    "row_templates", "state_contributions",
]
