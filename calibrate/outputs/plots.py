"""Diagnostic figures of a run: the loss curve and relative errors by target group."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from calibrate.outputs.tables import atomic_path, group_errors


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_loss(history: pd.DataFrame, path: Path) -> None:
    """Loss and error percentiles against epoch (log scale), saved to ``path``."""
    plt = _pyplot()
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(history["epoch"], history["loss"], color="C0")
    ax_loss.set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    for column, color in (("median_abs_rel_error", "C1"), ("p95_abs_rel_error", "C2"), ("max_abs_rel_error", "C3")):
        if column in history:
            ax_err.plot(history["epoch"], history[column], label=column.replace("_abs_rel_error", ""), color=color)
    ax_err.set(xlabel="epoch", ylabel="absolute relative error", yscale="log", title="target errors")
    ax_err.legend()
    fig.tight_layout()
    _save(fig, path, plt)


def plot_errors(table: pd.DataFrame, path: Path) -> None:
    """Median and max absolute relative error by variable and geo level, saved to ``path``."""
    plt = _pyplot()
    groups = group_errors(table)
    labels = [f"{v} ({g}, n={n})" for v, g, n in zip(groups.variable, groups.geo_level, groups.n)]
    y = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.35 * max(len(groups), 1)))
    floor = 1e-6  # keep exact fits visible on the log axis
    ax.barh(y, np.maximum(groups["max"], floor), color="C3", alpha=0.35, label="max")
    ax.barh(y, np.maximum(groups["p95"], floor), color="C1", alpha=0.6, label="p95")
    ax.barh(y, np.maximum(groups["median"], floor), color="C0", label="median")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(xscale="log", xlabel="absolute relative error", title="relative error by target group")
    ax.legend(loc="lower right")
    fig.tight_layout()
    _save(fig, path, plt)


def _save(fig, path: Path, plt) -> None:
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
