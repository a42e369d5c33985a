"""The HTML reports (``calibrate.report``): a ``geo=nc`` run, a ``geo=tiny`` fixture run, a 2-job sweep
and a synthetic 436-CD run, checked against their own files and in headless Chromium.

The runs are real (``python -m calibrate`` forked from one process that imported
policyengine-us once, ``tests/cli_zygote.py``); the all-CD run is synthesized from the real
target selection (``tests/synthetic_run.py``) because a ``geo=all`` run is too slow here.
Every expected figure is recomputed from ``targets.csv``, ``summary.json`` and ``weights.npy``.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from calibrate.report import write_report, write_report_or_warn
from calibrate.targets.geography import FIPS_STATE

DATA_BLOCK = re.compile(r'<script type="application/json" id="calibrate-data">(.*?)</script>', re.DOTALL)
TILES = "document.querySelectorAll('#map g.trace.scatter')[2].querySelectorAll('path.point').length"
ALL_POINTS = "document.querySelectorAll('#map g.trace.scatter path.point').length"
OPEN_SECONDS = 2.0  # the bound for the all-CD page


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("report")


@pytest.fixture(scope="session")
def zygote(work):
    from test_faults import Zygote

    z = Zygote(work)
    yield z
    z.close()


def _run(zygote, args: list[str]) -> str:
    code, log = zygote.run("calibrate", [*args, "progress=false"])
    assert code == 0, log[-3000:]
    return log


@pytest.fixture(scope="session")
def tiny_run(zygote, work) -> Path:
    run_dir = work / "tiny"
    log = _run(zygote, ["dataset=fixture", "geo=tiny", "fit=quick", f"hydra.run.dir={run_dir}"])
    assert f"report: {(run_dir / 'report.html').resolve()}" in log
    return run_dir


@pytest.fixture(scope="session")
def nc_run(zygote, work) -> Path:
    run_dir = work / "nc"
    _run(zygote, ["geo=nc", "fit.epochs=100", "holdout=random", f"hydra.run.dir={run_dir}"])
    return run_dir


@pytest.fixture(scope="session")
def sweep_dir(zygote, work) -> Path:
    sweep = work / "sweep"
    _run(zygote, ["-m", "dataset=fixture", "geo=tiny", "fit.epochs=50,100", f"hydra.sweep.dir={sweep}"])
    return sweep


@pytest.fixture(scope="session")
def all_run(work) -> Path:
    from synthetic_run import write_synthetic_run

    run_dir = write_synthetic_run(work / "all")
    write_report(run_dir)
    return run_dir


@pytest.fixture(scope="session")
def browser():
    from browser import Browser

    b = Browser()
    yield b
    b.close()


RUNS = ["tiny_run", "nc_run", "all_run"]


def embedded(html_path: Path) -> dict:
    match = DATA_BLOCK.search(html_path.read_text())
    assert match, f"no data block in {html_path}"
    return json.loads(match.group(1))


def _frame(table: dict) -> pd.DataFrame:
    return pd.DataFrame(table["rows"], columns=table["columns"])


def _same_column(got: pd.Series, want: pd.Series, name: str) -> None:
    if pd.api.types.is_numeric_dtype(want):
        np.testing.assert_array_equal(got.astype(float).to_numpy(), want.astype(float).to_numpy(), err_msg=name)
    else:
        assert got.fillna("").astype(str).tolist() == want.fillna("").astype(str).tolist(), name


def _split_errors(targets: pd.DataFrame) -> dict:
    """{split: {level: (n, median, p95, max)}} over the targets not excluded, recomputed here."""
    out = {}
    kept = targets[targets["status"] != "excluded"] if "status" in targets else targets
    split = kept["split"] if "split" in kept else pd.Series("train", index=kept.index)
    for name in sorted(set(split)):
        rows = kept[split == name]
        groups = dict(iter(rows.groupby("geo_level")))
        groups["all"] = rows
        out[name] = {lvl: (len(g), float(np.median(g.abs_rel_error)), float(np.percentile(g.abs_rel_error, 95)),
                           float(g.abs_rel_error.max())) for lvl, g in groups.items()}
    return out


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS)
def test_page_data_equals_run_files(run, request):
    run_dir = request.getfixturevalue(run)
    data = embedded(run_dir / "report.html")
    targets = pd.read_csv(run_dir / "targets.csv")
    summary = json.loads((run_dir / "summary.json").read_text())

    got = _frame(data["targets"])
    assert list(got.columns) == [*targets.columns, "state", "group"]
    for column in targets.columns:
        _same_column(got[column], targets[column], column)
    level, geo = targets["geo_level"].to_numpy(), targets["geographic_id"].to_numpy()
    states = [("US" if lvl == "national" else FIPS_STATE[g // 100 if lvl == "district" else g])
              for lvl, g in zip(level, geo)]
    assert got["state"].tolist() == states

    if "published_rel_se" in targets:  # the published margins, read from the run's database here
        import sqlite3

        with sqlite3.connect(summary["db_path"]) as db:
            moe = pd.read_sql("SELECT target_id, moe, moe_confidence FROM targets", db).set_index("target_id")
        row = moe.loc[targets.target_id]
        assert set(row.moe_confidence.dropna()) <= {0.9}
        value = targets.value_original.abs().to_numpy()
        want = np.where(value > 0, row.moe.to_numpy() / 1.6448536269514722 / np.where(value > 0, value, 1.0), np.nan)
        np.testing.assert_allclose(targets.published_rel_se, want, rtol=1e-9)  # NaN where no margin
    head = data["headline"]
    recomputed = _split_errors(targets)
    assert set(head["split_errors"]) == set(recomputed) == set(summary["split_errors"])
    for split, levels in recomputed.items():
        assert set(head["split_errors"][split]) == set(levels)
        for lvl, (n, median, p95, worst) in levels.items():
            for stats in (head["split_errors"][split][lvl], summary["split_errors"][split][lvl]):
                assert stats["n"] == n
                np.testing.assert_allclose([stats["median"], stats["p95"], stats["max"]], [median, p95, worst],
                                           rtol=1e-12, err_msg=f"{split}/{lvl}")
    for key in ("n_targets", "n_cds", "fraction_zero_weights", "n_nonzero_weights", "total_seconds", "device",
                "epochs", "holdout"):
        assert head[key] == summary[key], key
    prov = data["provenance"]
    assert [(i["name"], i["sha256"]) for i in prov["inputs"]] == [("dataset", summary["dataset_sha256"]),
                                                                   ("db", summary["db_sha256"])]
    assert prov["package_versions"] == summary["package_versions"]

    cds = _frame(data["cds"])
    assert cds["cd"].tolist() == summary["cds"]
    weights = np.load(run_dir / "weights.npy").reshape(len(summary["cds"]), -1)
    assert cds["active"].tolist() == np.count_nonzero(weights, axis=1).tolist()
    fitted = targets[(targets.geo_level == "district") & (targets.status == "fit")
                     & (targets.get("split", "train") == "train")]
    medians = fitted.groupby("geographic_id")["abs_rel_error"].median()
    np.testing.assert_allclose(cds["train_median"].astype(float), [medians.get(c, np.nan) for c in cds["cd"]])

    rec = data["reconcile"]
    assert _frame(rec["excluded"])["target_id"].tolist() == targets[targets.status == "excluded"].target_id.tolist()
    scaled = _frame(rec["scaled"])
    is_scaled = targets["reason"].fillna("").str.startswith("scaled")
    assert scaled["n_children"].sum() == is_scaled.sum() == summary["reconcile"]["n_scaled"]
    ratio = (targets.value / targets.value_original)[is_scaled]
    assert np.allclose(np.sort(scaled["factor"]), np.sort(ratio.groupby(targets["reason"][is_scaled]).median()))


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS)
def test_page_in_browser(run, request, browser, work):
    """No console errors; one map tile per CD; sorting by error puts the worst target first; not blank."""
    from PIL import Image

    run_dir = request.getfixturevalue(run)
    summary = json.loads((run_dir / "summary.json").read_text())
    targets = pd.read_csv(run_dir / "targets.csv")
    page, errors, _ = browser.open(run_dir / "report.html")
    page.evaluate("window.reportDrawAll()")
    n_cds = len(summary["cds"])
    assert page.evaluate(TILES) == n_cds
    assert page.evaluate(ALL_POINTS) == 51 + n_cds  # the state cells are markers too

    first_cd = summary["cds"][0]
    page.locator("#map").scroll_into_view_if_needed()
    box = page.locator("#map g.trace.scatter").nth(2).locator("path.point").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)  # plotly's drag layer is on top
    label = f"{FIPS_STATE[first_cd // 100]}-{first_cd % 100:02d}"
    page.wait_for_selector(f"#map .hoverlayer text:has-text('{label}')", timeout=10_000)

    page.locator('#targets-table .tabulator-col[tabulator-field="abs_rel_error"] .tabulator-col-title').click()
    first = page.locator('#targets-table .tabulator-row').first.locator('[tabulator-field="target_id"]').inner_text()
    worst = targets.abs_rel_error.max()
    assert targets.loc[targets.target_id == int(first), "abs_rel_error"].item() == worst
    assert page.locator("#targets-table .tabulator-row").count() > 0

    shot = page.screenshot(full_page=True)
    (work / f"{run}.png").write_bytes(shot)
    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"), dtype=float)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200
    assert errors == []
    page.close()


@pytest.mark.slow
def test_all_cd_page_opens_in_two_seconds(all_run, browser):
    """The 436-CD, 10,325-target page is ready (data parsed, first view drawn) within 2 s, best of 3 loads.

    Measured twice: the main thread's CPU time until ready (Chromium's own accounting, the
    same however busy the machine is) and wall time, whose bound grows with the load
    average when other work shares the cores.
    """
    walls, cpus = [], []
    for _ in range(3):
        page, errors, took = browser.open(all_run / "report.html")
        cpus.append(browser.main_thread_seconds())
        assert errors == []
        walls.append(took)
        page.close()
    busy = max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    print(f"all-CD report.html ({(all_run / 'report.html').stat().st_size / 1e6:.1f} MB) ready in "
          + ", ".join(f"{s:.2f}" for s in walls) + " s; main thread " + ", ".join(f"{s:.2f}" for s in cpus)
          + f" s CPU (load {busy:.1f}x the cores)")
    assert min(cpus) <= OPEN_SECONDS
    assert min(walls) <= OPEN_SECONDS * busy


@pytest.mark.slow
def test_sweep_page(sweep_dir, browser, work):
    """sweep.html: one row per job with its parameters and errors (= sweep.csv), each job linking to its report."""
    table = pd.read_csv(sweep_dir / "sweep.csv")
    data = embedded(sweep_dir / "sweep.html")
    jobs = _frame(data["jobs"])
    assert jobs["job"].tolist() == table["job"].astype(str).tolist() == ["0", "1"]
    assert data["parameters"] == ["fit.epochs"]
    for column in ("fit.epochs", "status", "fraction_zero_weights", "train_all_median", "train_all_p95"):
        _same_column(jobs[column], table[column], column)
    page, errors, _ = browser.open(sweep_dir / "sweep.html")
    page.evaluate("window.reportDrawAll()")
    assert page.locator("#jobs-table .tabulator-row").count() == 2
    links = page.locator("#jobs-table a")
    hrefs = [links.nth(i).get_attribute("href") for i in range(links.count())]
    assert hrefs == ["0/report.html", "1/report.html"]
    assert all((sweep_dir / h).is_file() for h in hrefs)
    links.first.click()
    page.wait_for_function("window.reportReady === true", timeout=60_000)
    assert page.url.endswith("/0/report.html")
    page.evaluate("window.reportDrawAll()")
    assert page.evaluate(TILES) == len(json.loads((sweep_dir / "0" / "summary.json").read_text())["cds"])
    (work / "sweep.png").write_bytes(page.screenshot())
    assert errors == []
    page.close()


@pytest.mark.slow
def test_sweep_page_marks_failed_jobs(sweep_dir, browser, work):
    """A job that failed on bad input is a red row with its error and no link; the others still link."""
    from calibrate.app.sweep import main as sweep_main

    copy = work / "sweep-failed"
    shutil.copytree(sweep_dir, copy)
    failed = copy / "2" / ".hydra"
    failed.mkdir(parents=True)
    (failed / "overrides.yaml").write_text("- fit.epochs=-1\n")
    (copy / "2" / "error.json").write_text(json.dumps({"status": "failed", "error": "fit.epochs must be > 0"}))
    assert sweep_main([str(copy)]) == 2
    page, errors, _ = browser.open(copy / "sweep.html")
    page.evaluate("window.reportDrawAll()")
    rows = page.locator("#jobs-table .tabulator-row")
    assert rows.count() == 3
    bad = rows.nth(2)
    assert "failed" in bad.get_attribute("class") and bad.locator("a").count() == 0
    assert "fit.epochs must be > 0" in bad.inner_text()
    assert rows.nth(0).locator("a").count() == 1
    assert "1 not complete" in page.locator("header").inner_text()
    assert errors == []
    page.close()


@pytest.mark.slow
def test_rebuild_from_run_dir_and_bad_input(tiny_run, work, capsys):
    """``python -m calibrate.report DIR`` rebuilds the same page; bad input is one error line, exit 2."""
    from calibrate.report.__main__ import main

    copy = work / "tiny-copy"
    shutil.copytree(tiny_run, copy)
    (copy / "report.html").unlink()
    assert main([str(copy)]) == 0
    assert embedded(copy / "report.html")["targets"] == embedded(tiny_run / "report.html")["targets"]
    capsys.readouterr()

    assert main([str(work / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nope" in err[0]
    (copy / "summary.json").rename(copy / "summary.moved")
    assert main([str(copy)]) == 2
    assert "lacks summary.json" in capsys.readouterr().err
    (copy / "summary.moved").rename(copy / "summary.json")
    pd.read_csv(copy / "targets.csv").drop(columns=["abs_rel_error"]).to_csv(copy / "targets.csv", index=False)
    assert main([str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "targets.csv" in err[0] and "abs_rel_error" in err[0]
    assert main([]) == 2 and "usage" in capsys.readouterr().err


@pytest.mark.slow
def test_report_failure_is_a_warning(tiny_run, work, caplog):
    """A report that cannot be written leaves the finished run as it was and logs a warning."""
    copy = work / "tiny-broken"
    shutil.copytree(tiny_run, copy)
    (copy / "report.html").unlink()
    summary = (copy / "summary.json").read_bytes()
    (copy / "targets.csv").write_text("not,a,targets,table\n")
    with caplog.at_level("WARNING"):
        assert write_report_or_warn(copy) is None
    assert any("report.html not written" in r.getMessage() for r in caplog.records)
    assert (copy / "summary.json").read_bytes() == summary
    assert not (copy / "report.html").exists() and not list(copy.glob(".*.tmp"))


def test_report_written_after_summary(tiny_run):
    assert (tiny_run / "report.html").stat().st_mtime_ns >= (tiny_run / "summary.json").stat().st_mtime_ns
    assert not list(tiny_run.glob(".*.tmp"))


def test_tiles_fill_their_state_without_overlap(target_db):
    """Every CD of the database gets a tile inside its state's cell; no two tiles overlap; states don't share cells."""
    from calibrate.report import tiles
    from calibrate.targets import all_cds

    cds = all_cds(target_db)
    placed = tiles.cd_tiles(tiles.group_cds(cds))
    assert sorted(t.cd for t in placed) == sorted(cds) and len(cds) == 436
    assert len(set(tiles.GRID.values())) == len(tiles.GRID) == 51
    for t in placed:
        x0, y0 = tiles.state_origin(t.state)
        assert FIPS_STATE[t.cd // 100] == t.state
        assert x0 <= t.x - t.size / 2 and t.x + t.size / 2 <= x0 + 1 and y0 <= t.y - t.size / 2
        assert t.y + t.size / 2 <= y0 + 1 - tiles.LABEL_BAND + 1e-9  # below the state's name
    by_state: dict[str, list] = {}
    for t in placed:
        by_state.setdefault(t.state, []).append(t)
    for group in by_state.values():
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                assert abs(a.x - b.x) >= a.size - 1e-9 or abs(a.y - b.y) >= a.size - 1e-9
