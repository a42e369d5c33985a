"""The project's Hydra sweeper for Optuna >= 3 (``hydra/sweeper=tune``, conf/hydra/sweeper/tune.yaml).

``hydra-optuna-sweeper`` pins ``optuna<3``, whose SQL storage fails with SQLAlchemy 2; this
sweeper runs the same kind of study on current Optuna, stored in SQLite so that a killed
study resumes and optuna-dashboard can read it. See docs/cli.md, "Tuning".
"""
