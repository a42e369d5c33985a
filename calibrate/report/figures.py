"""The report's charts, built with plotly and embedded as figure JSON (drawn by plotly.js in the page).

* ``map``: the tile-grid map (:mod:`calibrate.report.tiles`), one square marker per CD of
  the run, coloured by a figure chosen in a drop-down (only the figures this run has);
* ``curves``: loss, error percentiles and the active share of weights over epochs;
* ``groups``: median / p95 / max error per target group and level;
* ``multipliers``: the per-CD weight-multiplier distribution (when the run has weight quality);
* ``sweep``: each sweep job's median error against its sparsity.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from calibrate.report import tiles

CELL_PX = 78  # one state cell on the map, in pixels
MAX_VARIABLES = 8  # a group with more variables at one level gets one bar in the group chart
CD_TRACE = 2  # the map's traces: state cells, state names, CDs (one marker each)
MAP_MARGIN = {"l": 10, "r": 150, "t": 40, "b": 10}
# (column, drop-down label, colour scale, value format)
MAP_FIGURES = [
    ("train_median", "median error (district targets)", "YlOrRd", ".2%"),
    ("holdout_median", "holdout median error (district targets)", "YlOrRd", ".2%"),
    ("active", "active households", "Blues", ",.0f"),
    ("ess", "effective sample size", "Blues", ",.0f"),
]
HOVER = [("train_n", "district targets", "d"), ("train_median", "median error", ".2%"),
         ("train_max", "max error", ".2%"), ("holdout_median", "holdout median error", ".2%"),
         ("active", "active households", ",d"), ("active_share", "active share", ".1%"),
         ("ess", "effective sample size", ",.0f"), ("top10_share", "top-10 weight share", ".1%"),
         ("multiplier_max", "max multiplier", ",.1f")]


def _json(fig) -> dict:
    return json.loads(fig.to_json())


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return format(int(value) if spec.endswith("d") else float(value), spec)


def map_columns(cds: pd.DataFrame) -> tuple[list[tuple], list[str]]:
    """(the map figures this run has, the labels of those it has not)."""
    have, missing = [], []
    for column, label, scale, spec in MAP_FIGURES:
        present = column in cds and cds[column].notna().any()
        (have if present else missing).append((column, label, scale, spec) if present else label)
    return have, missing


def tile_map(cds: pd.DataFrame, title: str = "") -> dict:
    """The tile-grid map of the run's CDs (``cds``: :func:`calibrate.report.data.cd_frame`)."""
    import plotly.graph_objects as go

    layout_tiles = {t.cd: t for t in tiles.cd_tiles(tiles.group_cds(cds["cd"].tolist()))}
    placed = [layout_tiles[int(cd)] for cd in cds["cd"]]
    have, _ = map_columns(cds)
    hover = []
    for row in cds.itertuples(index=False):
        parts = [f"<b>{row.label}</b> ({row.cd})"]
        parts += [f"{name}: {_fmt(getattr(row, col), spec)}" for col, name, spec in HOVER if col in cds]
        hover.append("<br>".join(parts))
    run_states = {t.state for t in placed}
    cells = [(state, *tiles.state_origin(state), state in run_states) for state in tiles.GRID]
    fig = go.Figure()  # state cells and names as two scatter traces (cheaper to draw than 102 shapes/annotations)
    fig.add_trace(go.Scatter(
        x=[x + 0.5 for _, x, _, _ in cells], y=[y + 0.5 for _, _, y, _ in cells], mode="markers",
        hoverinfo="skip", name="states", marker={
            "symbol": "square", "size": CELL_PX * 0.94,
            "color": ["#ffffff" if inside else "#f0f1f3" for *_, inside in cells],
            "line": {"color": ["#8a8f98" if inside else "#d5d8dc" for *_, inside in cells], "width": 1}}))
    fig.add_trace(go.Scatter(
        x=[x + 0.07 for _, x, _, _ in cells], y=[y + 0.87 for _, _, y, _ in cells], mode="text", hoverinfo="skip",
        text=[state for state, *_ in cells], textposition="middle right", name="state names",
        textfont={"size": 11, "color": ["#222" if inside else "#a0a4aa" for *_, inside in cells]}))
    first = have[0] if have else None
    values = cds[first[0]].astype(float).where(cds[first[0]].notna(), None).tolist() if first else None
    fig.add_trace(go.Scatter(
        x=[t.x for t in placed], y=[t.y for t in placed], mode="markers", name="CDs",
        customdata=cds["cd"].tolist(), text=hover, hovertemplate="%{text}<extra></extra>",
        marker={"symbol": "square", "size": [max(4.0, t.size * CELL_PX * 0.9) for t in placed],
                    "color": values, "colorscale": first[2] if first else None, "showscale": bool(first),
                    "colorbar": {"title": {"text": first[1] if first else "", "side": "right"},
                                  "tickformat": first[3] if first else None},
                    "line": {"color": "#555", "width": 0.5}},
    ))
    buttons = [{"label": label, "method": "restyle", "args": [{
        "marker.color": [cds[col].astype(float).where(cds[col].notna(), None).tolist()],
        "marker.colorscale": scale, "marker.colorbar.title.text": label, "marker.colorbar.tickformat": spec,
    }, [CD_TRACE]]} for col, label, scale, spec in have]
    width = tiles.N_COLS * CELL_PX + MAP_MARGIN["l"] + MAP_MARGIN["r"]
    height = tiles.N_ROWS * CELL_PX + MAP_MARGIN["t"] + MAP_MARGIN["b"]
    axis = {"visible": False, "fixedrange": True}
    fig.update_layout(
        width=width, height=height, margin=MAP_MARGIN, plot_bgcolor="white", paper_bgcolor="white",
        xaxis=dict(range=[0, tiles.N_COLS], **axis), yaxis=dict(range=[0, tiles.N_ROWS], **axis),
        showlegend=False, hoverlabel={"align": "left"}, title={"text": title, "x": 0.01, "font": {"size": 13}},
        updatemenus=[{"buttons": buttons, "direction": "down", "x": 1.0, "xanchor": "right", "y": 1.07,
                      "yanchor": "top", "showactive": True}] if len(buttons) > 1 else [],
    )
    return _json(fig)


def curves(history: pd.DataFrame | None, n_weights: int | None, target_share: float | None) -> dict | None:
    """Loss, error percentiles and the share of nonzero weights against epoch."""
    if history is None or history.empty or "epoch" not in history:
        return None
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=3, subplot_titles=("loss", "target errors (fitted targets)",
                                                        "active weights (share nonzero)"))
    epoch = history["epoch"]
    fig.add_trace(go.Scatter(x=epoch, y=history["loss"], name="loss", mode="lines"), row=1, col=1)
    for column, name in (("median_abs_rel_error", "median"), ("p95_abs_rel_error", "p95"),
                         ("max_abs_rel_error", "max")):
        if column in history:
            fig.add_trace(go.Scatter(x=epoch, y=history[column], name=f"{name} error", mode="lines"), row=1, col=2)
    if "n_active" in history and n_weights:
        fig.add_trace(go.Scatter(x=epoch, y=history["n_active"] / n_weights, name="active share", mode="lines"),
                      row=1, col=3)
        if target_share:
            fig.add_trace(go.Scatter(x=[epoch.min(), epoch.max()], y=[target_share] * 2, mode="lines",
                                     name=f"sparsity target ({target_share:.0%} active)",
                                     line={"dash": "dot", "color": "#888"}), row=1, col=3)
    fig.update_yaxes(type="log", dtick=1, row=1, col=1)
    fig.update_yaxes(type="log", dtick=1, tickformat=".1~%", row=1, col=2)
    fig.update_yaxes(tickformat=".0%", rangemode="tozero", row=1, col=3)
    fig.update_xaxes(title_text="epoch")
    fig.update_layout(height=340, margin={"l": 50, "r": 20, "t": 40, "b": 40}, legend={"orientation": "h", "y": -0.25})
    return _json(fig)


def groups(targets: pd.DataFrame) -> dict | None:
    """Median / p95 / max absolute error of the fitted training targets per group, variable and level."""
    import plotly.graph_objects as go

    t = targets
    if "status" in t:
        t = t[t["status"] != "excluded"]
    if "split" in t:
        t = t[t["split"] != "holdout"]
    if t.empty:
        return None
    t = t.assign(variable=t["variable"].astype(str))
    many = t.groupby(["group", "geo_level"])["variable"].transform("nunique") > MAX_VARIABLES
    t.loc[many, "variable"] = "all variables"  # e.g. the ~30 one-target national totals: one bar
    err = t.groupby(["group", "variable", "geo_level"], sort=True)["abs_rel_error"]
    stats = err.agg(n="size", median="median", p95=lambda s: float(np.percentile(s, 95)), max="max").reset_index()
    names = [f"{g} · {v} · {lvl} (n={n})" for g, v, lvl, n in
             zip(stats["group"], stats["variable"], stats["geo_level"], stats["n"])]
    fig = go.Figure()
    for column, color in (("max", "#f4a6a6"), ("p95", "#f6c453"), ("median", "#3b78c2")):
        fig.add_trace(go.Bar(y=names, x=np.maximum(stats[column], 1e-6), name=column, orientation="h",
                             marker_color=color, hovertemplate="%{y}<br>" + column + " %{x:.3%}<extra></extra>"))
    fig.update_layout(barmode="overlay", height=130 + 24 * len(names), margin={"l": 10, "r": 20, "t": 50, "b": 40},
                      xaxis={"type": "log", "dtick": "D2", "title": "absolute relative error (log scale)",
                             "tickformat": ".2~%"},
                      yaxis={"autorange": "reversed", "automargin": True},
                      legend={"orientation": "h", "x": 0, "y": 1.0, "yanchor": "bottom"})
    return _json(fig)


def multipliers(cds: pd.DataFrame) -> dict | None:
    """Histograms over CDs of the weight multipliers' median, p99 and max (weight_quality.csv)."""
    columns = [c for c in ("multiplier_p50", "multiplier_p99", "multiplier_max") if c in cds and cds[c].notna().any()]
    if not columns:
        return None
    import plotly.graph_objects as go

    values = cds[columns].to_numpy(dtype=float)
    edges = np.histogram_bin_edges(values[np.isfinite(values)], bins=40)
    fig = go.Figure()
    for column in columns:  # bars of numpy counts: the page's plotly.js bundle has no histogram trace
        counts, _ = np.histogram(cds[column].dropna(), bins=edges)
        fig.add_trace(go.Bar(x=(edges[:-1] + edges[1:]) / 2, y=counts, width=np.diff(edges), opacity=0.6,
                             name=column.replace("multiplier_", "")))
    fig.update_layout(barmode="overlay", height=300, margin={"l": 50, "r": 20, "t": 30, "b": 40},
                      xaxis={"title": "weight multiplier (fitted / base weight), per CD"},
                      yaxis={"title": "CDs"}, legend={"orientation": "h", "y": 1.1})
    return _json(fig)


def sweep_chart(table: pd.DataFrame, params: list[str]) -> dict | None:
    """Median error (train, holdout) of each complete job against its share of zero weights."""
    import plotly.graph_objects as go

    done = table[table["status"] == "complete"] if "status" in table else table
    settings = [" ".join(f"{p}={row[p]}" for p in params) for _, row in done.iterrows()]
    done = done.assign(_settings=settings)
    fig = go.Figure()
    for column, name, symbol in (("train_all_median", "train", "circle"), ("holdout_all_median", "holdout", "square")):
        if column not in done or "fraction_zero_weights" not in done:
            continue
        rows = done[done[column].notna()]
        if rows.empty:
            continue
        fig.add_trace(go.Scatter(x=rows["fraction_zero_weights"], y=rows[column], mode="markers+text",
                                 name=f"{name} targets", text=[f"job {j}" for j in rows["job"]],
                                 textposition="top right", marker={"symbol": symbol, "size": 10},
                                 customdata=rows["_settings"],
                                 hovertemplate="%{text}: %{customdata}<br>zero weights %{x:.1%}<br>"
                                               "median error %{y:.3%}<extra>" + name + "</extra>"))
    if not fig.data:
        return None
    fig.update_layout(height=360, margin={"l": 60, "r": 20, "t": 30, "b": 50},
                      xaxis={"title": "share of weights exactly zero", "tickformat": ".0%"},
                      yaxis={"title": "median abs rel error (all levels)", "tickformat": ".2%"})
    return _json(fig)
