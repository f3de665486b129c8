"""The layout's dependency rules (README "Layout"): each package imports only the ones below it,
and inside sql_magics the executor and what it calls never reach back into the Session."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (TYPE_CHECKING blocks included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def imports_any(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(n for n in imported_modules(path) if any(n == f or n.startswith(f + ".") for f in forbidden))


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("udf_engine", ("arrow_bridge", "sql_magics", "duckdb", "IPython")),  # the engine knows nothing of SQL
        ("arrow_bridge", ("sql_magics", "IPython")),  # the bridge knows nothing of Jupyter
    ],
)
def test_packages_depend_one_way(package, forbidden):
    offenders = {p.name: imports_any(p, forbidden) for p in sorted((ROOT / package).glob("*.py"))}
    assert {name: found for name, found in offenders.items() if found} == {}


# The surface (session, magics, cli, demo) calls these; they never import it.
BELOW_THE_SURFACE = ["executor", "registration", "commands", "registry", "database", "script_state", "formats", "catalog"]


@pytest.mark.parametrize("module", BELOW_THE_SURFACE)
def test_the_executor_side_never_imports_the_session(module):
    surface = ("sql_magics.Session", "sql_magics.session", "sql_magics.magics", "sql_magics.cli", "sql_magics.demo")
    assert imports_any(ROOT / "sql_magics" / f"{module}.py", surface) == []
