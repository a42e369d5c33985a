"""calibrate: geo-stacked L0 calibration of US household weights to congressional-district targets.

The pipeline, one package per stage (each mirrors a config group under ``conf/``)::

    targets  ->  matrix  ->  fit  ->  outputs  ->  publish
    (target/,    (dataset/,   (fit/,   (run dir)    (publish/)
     geo/)        geo/)        gpu/)

``app`` wires the stages for ``python -m calibrate`` (Hydra); ``core`` holds what every
stage shares (errors, paths, policyengine access, h5 datasets); ``etl`` builds
``storage/`` from the public sources. See docs/architecture.md.
"""

__version__ = "0.1.0"
