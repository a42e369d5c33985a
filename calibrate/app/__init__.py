"""The application layer behind ``python -m calibrate``: typed Hydra configs (``config``),
the pipeline that wires the stages (``run``), device selection (``device``) and the sweep
table callback (``sweep``). The stages themselves know nothing about Hydra."""
