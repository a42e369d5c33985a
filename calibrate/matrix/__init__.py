"""Stage 2, matrix: the geo-stacked calibration matrix X (n_targets, n_households * n_cds).

Takes the base dataset (``conf/dataset/``), the CD list (``conf/geo/``) and the selected
targets; gives a :class:`CalibrationMatrix` (targets, CSR X with column
``cd_idx * n_households + hh_idx``, household layout). ``contributions`` defines what a
household contributes to a target, ``stacking`` replicates households so several states
share one simulation, ``tracer`` explains rows, columns and cells.
"""

from calibrate.matrix.build import (
    CalibrationMatrix,
    assemble,
    build_matrix,
    cache_key,
    compute_state_values,
    row_templates,
    state_contributions,
)

__all__ = [
    "CalibrationMatrix", "assemble", "build_matrix", "cache_key", "compute_state_values", "row_templates",
    "state_contributions",
]
