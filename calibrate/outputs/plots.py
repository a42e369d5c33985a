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



SWEEP_X = (("fraction_zero_weights", "fraction of weights exactly zero"), ("total_seconds", "job wall time (s)"))
SWEEP_Y = (("train_all_median", "train", "C0", "o"), ("holdout_all_median", "holdout", "C1", "s"))


def plot_sweep(table: pd.DataFrame, path: Path) -> dict:
    """Median absolute relative error (train, holdout) of each job against sparsity and wall time.

    ``table`` is the sweep table (one row per job, ``calibrate.app.sweep.sweep_table``);
    jobs that did not complete are named in the legends and under the plots. Returns what
    was drawn, read back from the figure: ``{(x column, y column): (jobs, points)}`` with
    ``points`` an (n, 2) array, and ``"not_complete"``: the jobs marked as not complete.
    """
    plt = _pyplot()
    complete = table["status"] == "complete"
    done, bad = table[complete], table[~complete]
    drawn: dict = {"not_complete": [str(j) for j in bad["job"]]}
    fig, axes = plt.subplots(1, len(SWEEP_X), figsize=(11, 4.4))
    for ax, (x_col, x_label) in zip(axes, SWEEP_X):
        for y_col, label, color, marker in SWEEP_Y:
            rows = done[done[x_col].notna() & done[y_col].notna()] if {x_col, y_col} <= set(done) else done.iloc[:0]
            if rows.empty:
                continue
            points = ax.scatter(rows[x_col].astype(float), rows[y_col].astype(float), color=color, marker=marker,
                                label=f"{label} targets")
            offsets = np.asarray(points.get_offsets(), dtype=float)
            for job, (x, y) in zip(rows["job"], offsets):
                ax.annotate(str(job), (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7, color=color)
            drawn[(x_col, y_col)] = ([str(j) for j in rows["job"]], offsets)
        _sweep_axes(ax, x_label, drawn["not_complete"])
    if len(bad):
        fig.text(0.01, 0.01, _not_complete_note(bad), color="C3", fontsize=7)
    fig.suptitle(f"sweep: {len(done)} jobs complete, {len(bad)} not (point labels: job number)", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _save(fig, path, plt)
    return drawn


def _sweep_axes(ax, x_label: str, not_complete: list[str]) -> None:
    """Labels, log scale when every error is positive, legend with a marker for jobs that did not complete."""
    from matplotlib.lines import Line2D

    handles, _ = ax.get_legend_handles_labels()
    if not_complete:
        handles.append(Line2D([], [], color="C3", marker="x", linestyle="none",
                              label=f"not complete: job {', '.join(not_complete)}"))
    if handles:
        ax.legend(handles=handles, fontsize=8)
    if ax.collections and all((c.get_offsets()[:, 1] > 0).all() for c in ax.collections):
        ax.set_yscale("log")
    if x_label.startswith("fraction"):
        low, high = ax.get_xlim()
        ax.set_xlim(max(low, -0.02), min(high, 1.02))
    ax.set(xlabel=x_label, ylabel="median abs rel error (all levels)", title=f"error vs {x_label.split(' (')[0]}")
    ax.grid(alpha=0.3)


def _not_complete_note(bad: pd.DataFrame) -> str:
    """``job 1: failed (fit: lr must be > 0); job 3: incomplete``."""
    errors = bad["error"].fillna("").astype(str) if "error" in bad else pd.Series([""] * len(bad), index=bad.index)
    return "; ".join(f"job {job}: {status}" + (f" ({err[:70]})" if err else "")
                     for job, status, err in zip(bad["job"], bad["status"], errors))
