"""The package layout keeps its rules (docs/architecture.md): every module sits in a stage
package, stages import only earlier stages and ``core``, only entry points import ``app``,
the numerical core imports neither Hydra nor policyengine-us, and no module is far over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from calibrate.core import paths

PACKAGE = paths.REPO_ROOT / "calibrate"
ORDER = ["core", "targets", "matrix", "reconcile", "fit", "outputs", "report", "publish", "app", "etl"]
ENTRY_POINTS = {"calibrate/__init__.py", "calibrate/__main__.py", "calibrate/tracer.py"}


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> set[str]:
    """Every ``calibrate.<package>`` a module imports (absolute or relative), anywhere in the file."""
    found = set()
    package = path.relative_to(PACKAGE).parts[0]
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve to this package
                names = [f"calibrate.{package}"]
            elif node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "calibrate" and len(parts) > 1 and parts[1] in ORDER:
                found.add(parts[1])
    return found


def test_every_module_sits_in_a_stage_package():
    loose = [str(p.relative_to(paths.REPO_ROOT)) for p in _modules() if p.parent == PACKAGE]
    assert set(loose) <= ENTRY_POINTS
    assert {p.relative_to(PACKAGE).parts[0] for p in _modules() if p.parent != PACKAGE} <= set(ORDER)


@pytest.mark.parametrize("path", [p for p in _modules() if p.parent != PACKAGE], ids=lambda p: str(p.relative_to(PACKAGE)))
def test_stages_import_only_earlier_stages(path):
    own = path.relative_to(PACKAGE).parts[0]
    if own in ("app", "etl"):
        assert "app" not in _imports(path) or own == "app"
        return
    later = {pkg for pkg in _imports(path) if ORDER.index(pkg) > ORDER.index(own)}
    assert not later, f"{path.relative_to(PACKAGE)} ({own}) imports later stage(s) {sorted(later)}"


def test_numerical_core_knows_no_hydra_or_policyengine():
    for path in (PACKAGE / "fit").glob("*.py"):
        text = path.read_text()
        for name in ("hydra", "omegaconf", "policyengine"):
            assert f"import {name}" not in text and f"from {name}" not in text, (path.name, name)


def test_no_module_far_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in _modules() if (n := len(p.read_text().splitlines())) > 440}
    assert not long
