"""``python -m calibrate.tracer <run_dir> structure|row|column|cell|household``.

Entry-point alias: the tracer belongs to the matrix stage (:mod:`calibrate.matrix.tracer`);
a run directory's matrix is rebuilt by :func:`calibrate.app.trace.matrix_of_run`.
"""

import sys

from calibrate.matrix.tracer import MatrixTracer
from calibrate.matrix.tracer import main as _main

__all__ = ["MatrixTracer", "load_matrix", "main"]


def load_matrix(run_dir):
    """The matrix of a finished run directory (see :func:`calibrate.app.trace.matrix_of_run`)."""
    from calibrate.app.trace import matrix_of_run

    return matrix_of_run(run_dir)


def main(argv=None) -> int:
    return _main(argv, load=load_matrix)


if __name__ == "__main__":
    sys.exit(main())
