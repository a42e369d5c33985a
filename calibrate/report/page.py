"""Render the report pages (Jinja2) with plotly.js and Tabulator inlined: one file, no network.

The page's data is one JSON block (``<script type="application/json" id="calibrate-data">``);
``<`` ``>`` ``&`` are written as ``\\u003c`` etc. so no string in it can close the script.
plotly.js (its basic bundle) and Tabulator are vendored in ``calibrate/report/vendor/``
(``VENDOR.md`` names versions, licences and sources).
"""

from __future__ import annotations

import json
import logging
import re
from functools import lru_cache
from pathlib import Path

from calibrate.outputs.tables import atomic_path
from calibrate.report import data as report_data
from calibrate.report import figures

REPORT_FILE = "report.html"
SWEEP_PAGE = "sweep.html"
DATA_ID = "calibrate-data"
HERE = Path(__file__).resolve().parent
log = logging.getLogger(__name__)


def embed_json(obj) -> str:
    """JSON safe inside a ``<script>`` element (NaN refused: the data is cleaned first)."""
    text = json.dumps(obj, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def read_embedded(html: str) -> dict:
    """The data block of a page written here (what the tests read back)."""
    match = re.search(rf'<script type="application/json" id="{DATA_ID}">(.*?)</script>', html, re.DOTALL)
    if not match:
        raise ValueError(f"no {DATA_ID} block in the page")
    return json.loads(match.group(1))


VENDOR = HERE / "vendor"
PLOTLY_BASIC = VENDOR / "plotly-basic.min.js"
PLOTLY_BASIC_VERSION = "2.35.2"  # vendor/VENDOR.md


def plotly_js() -> str:
    """The vendored basic plotly.js bundle when the installed plotly draws with the same major
    version, else the installed package's full bundle (4x larger, 5x slower to open)."""
    from plotly.offline import get_plotlyjs, get_plotlyjs_version

    if get_plotlyjs_version().split(".")[0] == PLOTLY_BASIC_VERSION.split(".")[0]:
        return PLOTLY_BASIC.read_text()
    log.info("plotly.js %s installed: the report embeds its full bundle", get_plotlyjs_version())
    return get_plotlyjs()


@lru_cache(maxsize=1)
def assets() -> dict[str, str]:
    """The inlined scripts and styles."""
    return {"plotly_js": plotly_js(), "tabulator_js": (VENDOR / "tabulator.min.js").read_text(),
            "tabulator_css": (VENDOR / "tabulator.min.css").read_text()}


@lru_cache(maxsize=1)
def _environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(pct=_pct, num=_num, secs=_secs)
    return env


def _pct(value, digits: int = 2) -> str:
    return "–" if value is None else f"{float(value):.{digits}%}"


def _num(value, digits: int = 0) -> str:
    return "–" if value is None else f"{float(value):,.{digits}f}"


def _secs(value) -> str:
    if value is None:
        return "–"
    value = float(value)
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def render(template: str, page_data: dict) -> str:
    """A page from its template and data (the data is both rendered and embedded)."""
    return _environment().get_template(template).render(d=page_data, data_json=embed_json(page_data),
                                                        data_id=DATA_ID, **assets())


def write_page(path: Path, html: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return path


def report_data_for(run_dir) -> dict:
    """The run's page data with its figures."""
    files = report_data.read_run(run_dir)
    page = report_data.run_data(files)
    import pandas as pd

    cds = pd.DataFrame(page["cds"]["rows"], columns=page["cds"]["columns"])
    targets = report_data.targets_frame(files.targets)
    head = page["headline"]
    have, missing = figures.map_columns(cds)
    page["map_figures"] = {"shown": [label for _, label, _, _ in have], "not_in_run": missing}
    page["worst"] = report_data.frame_json(_worst(targets))
    page["figures"] = {
        "map": figures.tile_map(cds),
        "curves": figures.curves(files.history, head.get("n_weights"), head.get("sparsity_target_share")),
        "groups": figures.groups(targets),
        "multipliers": figures.multipliers(cds),
    }
    return report_data.clean(page)


def _worst(targets, top: int = 10):
    """The worst fitted targets (training and holdout) by absolute relative error."""
    fitted = targets[targets["status"] != "excluded"] if "status" in targets else targets
    cols = [c for c in ("label", "split", "value", "estimate", "rel_error") if c in fitted]
    return fitted.sort_values("abs_rel_error", ascending=False).head(top)[cols]


def write_report(run_dir) -> Path:
    """Write ``<run_dir>/report.html`` from the run's own files; returns its path."""
    page = report_data_for(run_dir)
    return write_page(Path(run_dir) / REPORT_FILE, render("report.html.j2", page))


def write_report_or_warn(run_dir) -> Path | None:
    """:func:`write_report`, a failure logged as a warning (the run it reports on stays complete)."""
    try:
        return write_report(run_dir)
    except Exception as exc:
        log.warning("report.html not written (%s: %s); rebuild it with python -m calibrate.report %s",
                    type(exc).__name__, exc, run_dir, exc_info=True)
        return None
