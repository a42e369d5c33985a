"""The package layout keeps its rules (docs/architecture.md): every module sits in a stage
package, stages import only earlier stages and ``core``, only entry points import ``app``,
the numerical core imports neither Hydra nor policyengine-us, and no module is far over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from calibrate.core import paths

PACKAGE = paths.REPO_ROOT / "calibrate"
ORDER = ["core", "targets", "matrix", "reconcile", "fit", "outputs", "uncertainty", "report", "publish", "app", "etl"]
ENTRY_POINTS = {"calibrate/__init__.py", "calibrate/__main__.py", "calibrate/tracer.py", "calibrate/moe.py"}


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


# The stacked column formula (cd_idx * n_households + hh_idx) and its inverses, however spelled.
STACKED_FORMULA = [
    r"[\w)\]]\s*\*\s*(self\.|matrix\.|m\.)?(n_hh|n_households)\b",
    r"\b(n_hh|n_households)\s*\*\s*\w",
    r"%\s*(self\.|matrix\.)?(n_hh|n_households)\b",
    r"divmod\([^)]*(n_hh|n_households)",
    r"//\s*len\(",
    r"reshape\(\s*(n_cds|len\(cds\)|len\(self\.cds\))",
    r"cd_idx\s*\*",
]
LAYOUT_MODULE = PACKAGE / "matrix" / "layout.py"


def test_stacked_column_formula_lives_in_one_module():
    """Columns <-> (CD, household) only through calibrate.matrix.layout.StackedLayout."""
    import re

    found = []
    for path in _modules():
        if path == LAYOUT_MODULE:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if any(re.search(pattern, line) for pattern in STACKED_FORMULA):
                found.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
    text = LAYOUT_MODULE.read_text()
    assert re.search(STACKED_FORMULA[0], text) and "def column(" in text  # the owner does hold it


def test_stage_configs_have_one_definition():
    """The fit and reconcile settings are defined once, in their stage (the app's schema uses those
    dataclasses), and no module maps config fields by name or parses error text to find a key."""
    app_config = (PACKAGE / "app" / "config.py").read_text()
    assert "class FitConf" not in app_config and "class SparsityConf" not in app_config
    assert "class ReconcileConf" not in app_config and "class ScaleRuleConf" not in app_config
    for path in _modules():
        text = path.read_text()
        assert "hasattr(fit," not in text and 'str(exc).split("=")' not in text, path.name
