"""The trade-off curve of a calibration setting: held-out error and effective sample size against training error.

    python benchmarks/plot_tradeoff.py out.png run1.json [run2.json ...] [--level district] [--holdouts random]

Reads the ``--json`` files of ``benchmarks/bench_holdout.py`` (one row per holdout and method) and
draws, for each method averaged over the holdouts it ran on (random seeds), the training error
(x: median and p95 of the level) against the held-out error (left: median, right: p95) and the
per-CD effective sample size (marker size and label); ``--holdouts`` picks the holdouts averaged
(default: the random ones). A sweep of one setting (e.g. methods
``pen1e3=fit.classical.penalty=1e3``, ``pen1e4=...``) makes one curve; the start and the dense
``fit=classical`` make reference points. Prints the table it draws.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np


def summarise(rows: list[dict], level: str) -> dict[str, dict]:
    """Per method: mean over its holdouts of train / held-out median and p95, ESS median and min, zero share."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_method[row["method"]].append(row)
    out = {}
    def mean(runs: list[dict], get) -> float:
        values = [v for v in (get(r) for r in runs) if v is not None]
        return float(np.mean(values)) if values else float("nan")

    for method, runs in by_method.items():
        out[method] = {
            "n": len(runs),
            "train_median": mean(runs, lambda r: r["scores"]["train"][level].get("median")),
            "train_p95": mean(runs, lambda r: r["scores"]["train"][level].get("p95")),
            "held_median": mean(runs, lambda r: r["scores"]["holdout"][level].get("median")),
            "held_p95": mean(runs, lambda r: r["scores"]["holdout"][level].get("p95")),
            "ess_median": mean(runs, lambda r: r["quality"]["ess"]["median"]),
            "ess_min": mean(runs, lambda r: r["quality"]["ess"]["min"]),
            "zero": mean(runs, lambda r: r["zero"]),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--level", default="district")
    p.add_argument("--holdouts", default="random", help="holdouts averaged: names or prefixes, comma-separated")
    a = p.parse_args()
    wanted = tuple(a.holdouts.split(","))
    rows = [row for path in a.runs for row in json.loads(path.read_text()) if row["holdout"].startswith(wanted)]
    table = summarise(rows, a.level)
    print(f"{'method':<14}{'runs':>5}{'train med':>10}{'train p95':>10}{'held med':>10}{'held p95':>10}"
          f"{'ESS med':>9}{'ESS min':>9}{'zero':>7}")
    for method, s in table.items():
        print(f"{method:<14}{s['n']:>5}{s['train_median']:>10.2%}{s['train_p95']:>10.2%}{s['held_median']:>10.2%}"
              f"{s['held_p95']:>10.2%}{s['ess_median']:>9.0f}{s['ess_min']:>9.0f}{s['zero']:>7.1%}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    ess = np.array([s["ess_median"] for s in table.values()])
    sizes = 20 + 200 * ess / max(float(ess.max()), 1.0)
    for ax, stat in zip(axes, ("median", "p95")):
        x = [100 * s[f"train_{stat}"] for s in table.values()]
        y = [100 * s[f"held_{stat}"] for s in table.values()]
        ax.scatter(x, y, s=sizes, alpha=0.6)
        for (method, s), xi, yi in zip(table.items(), x, y):
            ax.annotate(f"{method} (ESS {s['ess_median']:,.0f})", (xi, yi), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel(f"training {a.level} error, {stat} (%)")
        ax.set_ylabel(f"held-out {a.level} error, {stat} (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Held-out against training error ({a.level}; marker size: per-CD ESS median; "
                 f"mean over {max(s['n'] for s in table.values())} holdout(s))")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
