"""The trade-off curve of a calibration setting: held-out error and effective sample size against training error.

    python benchmarks/plot_tradeoff.py out.png run1.json [run2.json ...] [--level district] [--holdouts random]

Reads the ``--json`` files of ``benchmarks/bench_holdout.py`` (one row per holdout and method) and
draws, for each method averaged over the holdouts it ran on (random seeds), the held-out error
against the training error (median, p95) and against the per-CD effective sample size. Methods
named ``<letters><number>`` form one curve per prefix (a sweep of one setting); unfitted methods
(training median above 5 %, e.g. the start) are named in each panel's corner. ``--holdouts`` picks the
holdouts averaged (default: the random ones). A sweep of one setting (e.g. methods
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

    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fits = {m: v for m, v in table.items() if v["train_median"] < 0.05}  # the unfitted starts: named, not drawn
    refs = {m: v for m, v in table.items() if m not in fits}
    series: dict[str, list[str]] = defaultdict(list)  # a sweep: methods named <letters><number>...
    for method in fits:
        series[re.match(r"[A-Za-z_ ]*", method).group(0).strip() or method].append(method)
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    panels = (("train_median", "held_median", f"training {a.level} error, median (%)", f"held-out {a.level} error, median (%)"),
              ("train_p95", "held_p95", f"training {a.level} error, p95 (%)", f"held-out {a.level} error, p95 (%)"),
              ("ess_median", "held_p95", "effective households per CD, median", f"held-out {a.level} error, p95 (%)"))
    for ax, (xkey, ykey, xlabel, ylabel) in zip(axes, panels):
        scale = 1.0 if xkey.startswith("ess") else 100.0
        for name, members in series.items():
            pts = sorted((scale * fits[m][xkey], 100 * fits[m][ykey], m) for m in members)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) > 1 else "o", alpha=0.7, label=name)
            for x, y, m in pts:  # the setting's value (and "default") as the label; the legend names the sweep
                label = m[len(name):].strip() or m
                ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if refs:  # far above the fits: named in a corner, not drawn
            ax.text(0.98, 0.98, "\n".join(f"{m} (no fit): {100 * v[ykey]:.1f} %" for m, v in refs.items()),
                    transform=ax.transAxes, ha="right", va="top", fontsize=7, color="grey")
        if not xkey.startswith("ess"):
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Held-out against training error and effective sample size ({a.level}; mean over "
                 f"{max(v['n'] for v in table.values())} holdout(s) per point)")
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
