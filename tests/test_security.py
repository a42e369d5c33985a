"""Security basics: SQL is parametrised, nothing unpickles user-writable files, file names built
from config values stay inside their folder, and a database path cannot inject SQLite URI
parameters. The first two scan the package's source (its syntax tree), so new code is held
to them too."""

from __future__ import annotations

import ast
import shutil
import sqlite3
from pathlib import Path

import pytest

from calibrate.core import paths
from calibrate.core.rundir import UnsafeNameError, safe_child, safe_name
from calibrate.publish.inputs import resolve_areas
from calibrate.targets import all_cds, connect

PACKAGE = paths.REPO_ROOT / "calibrate"
SQL_CALLS = {"execute", "executemany", "executescript", "read_sql_query", "read_sql"}
PICKLE_EXEMPT: set[str] = set()  # none: the matrix cache stores checksummed plain-bytes entries (docs/matrix.md)


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name


def _built_string(node: ast.AST) -> bool:
    """An f-string with values, ``"..." % x``, ``"...".format(...)`` or a concatenation with a non-literal."""
    if isinstance(node, ast.JoinedStr):
        return any(isinstance(v, ast.FormattedValue) for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mod, ast.Add)):
        return not (isinstance(node.left, ast.Constant) and isinstance(node.right, ast.Constant))
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"


def _sources():
    return sorted(PACKAGE.rglob("*.py"))


def test_sql_statements_are_constant_strings():
    """Values reach SQLite as parameters (``?``), never pasted into the statement."""
    found = [
        f"{path.relative_to(paths.REPO_ROOT)}:{node.lineno}"
        for path in _sources() for node, _, name in _calls(path)
        if name in SQL_CALLS and node.args and _built_string(node.args[0])
    ]
    assert not found, f"SQL built from values (use ? parameters): {found}"


def test_scanners_flag_what_they_look_for(tmp_path):
    """The scans can fail: they flag SQL built with an f-string and every way of unpickling."""
    bad = tmp_path / "bad.py"
    bad.write_text('con.execute(f"SELECT * FROM t WHERE id = {x}")\ncon.execute("SELECT ?", (x,))\n')
    flagged = [n.lineno for n, _, name in _calls(bad) if name in SQL_CALLS and _built_string(n.args[0])]
    assert flagged == [1]
    bad.write_text("pickle.load(fh)\nnp.load(p, allow_pickle=True)\nnp.load(p, allow_pickle=False)\npd.read_pickle(p)\n")
    assert [n.lineno for n, owner, name in _calls(bad) if _unpickles(n, owner, name)] == [1, 2, 4]


def _unpickles(node: ast.Call, owner: str, name: str) -> bool:
    if owner in ("pickle", "dill", "cloudpickle", "joblib") and name in ("load", "loads"):
        return True
    allow = [k.value for k in node.keywords if k.arg == "allow_pickle"]
    return name == "read_pickle" or (name == "load" and any(not (isinstance(v, ast.Constant) and v.value is False)
                                                            for v in allow))


def test_no_pickle_from_user_writable_files():
    """No ``pickle.load(s)``, ``pd.read_pickle``, ``joblib.load`` or ``np.load(..., allow_pickle=True)``."""
    found = [
        f"{path.relative_to(paths.REPO_ROOT)}:{node.lineno}"
        for path in _sources() for node, owner, name in _calls(path)
        if _unpickles(node, owner, name) and str(path.relative_to(paths.REPO_ROOT)) not in PICKLE_EXEMPT
    ]
    assert not found, f"unpickling a file: {found}"


@pytest.mark.parametrize("name", ["../x.h5", "a/b.h5", "/etc/passwd", "..", ".", ".hidden", "x\x00.h5", "cd_1..h5", ""])
def test_unsafe_file_names_are_refused(name, tmp_path):
    with pytest.raises(UnsafeNameError):
        safe_child(tmp_path, name)


def test_every_area_name_is_a_plain_file_name():
    """The names of all published areas of an all-CD run (436 CDs, 51 states, nation) are plain."""
    cds = tuple(all_cds(paths.TARGET_DB))
    areas = resolve_areas(["cd", "state", "national"], cds)
    assert len(areas) == 436 + 51 + 1
    for area in areas:
        assert safe_name(f"{area.name}.h5") == f"{area.name}.h5" and "/" not in area.name


def test_database_path_cannot_inject_uri_parameters(tmp_path):
    """A file name holding ``?mode=rwc#`` opens that very file, read-only, and creates nothing."""
    path = tmp_path / "targets ?mode=rwc#%41.db"
    shutil.copy(paths.TARGET_DB, path)
    assert len(all_cds(path)) == 436
    with connect(path) as con, pytest.raises(sqlite3.OperationalError, match="readonly"):
        con.execute("DELETE FROM targets")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
