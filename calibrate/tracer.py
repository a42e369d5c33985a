"""``python -m calibrate.tracer <run_dir | matrix file> structure|row|column|cell|household``.

Entry-point alias: the tracer belongs to the matrix stage (:mod:`calibrate.matrix.tracer`).
"""

import sys

from calibrate.matrix.tracer import MatrixTracer, load_matrix, main

__all__ = ["MatrixTracer", "load_matrix", "main"]

if __name__ == "__main__":
    sys.exit(main())
