"""Write the L0 fit's inputs of a run to one .npz, for ``bench_fit.py --problem`` (e.g. all 436 CDs).

    python benchmarks/dump_fit_problem.py /tmp/allcd.npz geo=all cache_dir=storage/cache

Runs ``python -m calibrate fit=l0 <overrides>`` up to the fit (matrix, reconcile, initial weights),
then writes X (CSR parts), the targets, initial weights, loss weights, tolerances and column groups
uncompressed (``np.load(..., allow_pickle=False)`` reads it) and stops before fitting.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import calibrate.fit as fit  # noqa: E402


class _Written(SystemExit):
    pass


def save_problem(path: Path, X, targets, init, loss_weights, tolerances, column_groups) -> None:
    """The fit's inputs as one npz (no pickle)."""
    X = X.tocsr()
    np.savez(path, data=X.data, indices=X.indices, indptr=X.indptr, shape=np.asarray(X.shape), targets=targets,
             init=init, loss_weights=loss_weights, column_groups=column_groups,
             tolerances=np.zeros(X.shape[0]) if tolerances is None else tolerances)


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit(__doc__)
    out, overrides = Path(argv[0]), argv[1:]

    def dump(X, targets, init, config=None, **kw):
        save_problem(out, X, np.asarray(targets), np.asarray(init), kw.get("loss_weights"), kw.get("tolerances"),
                     kw.get("column_groups"))
        print(f"wrote {out}: X {X.shape[0]} x {X.shape[1]}, {X.nnz:,} nonzeros", flush=True)
        raise _Written(0)

    fit.fit_l0 = dump  # the run's fit stage imports it from calibrate.fit when it starts
    from calibrate.__main__ import main as calibrate_main

    sys.argv = ["calibrate", "fit=l0", "progress=false", "hydra.run.dir=/tmp/dump_fit_problem", *overrides]
    try:
        calibrate_main()
    except _Written:
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
