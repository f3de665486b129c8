"""The layout's dependency rules (README "Layout"): each package imports only the ones below it, each
wing only the wings below it, nothing imports the fronts, and no modules import each other in a circle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("udf_engine", "arrow_bridge", "sql_magics")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


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


def project_imports(path: Path) -> set[str]:
    """The project modules a file imports: ``from a.b import c`` is a.b.c when that is a module, else a.b."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in MODULES)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                found.add(target if target in MODULES else node.module)
    return found & set(MODULES)


def files(*prefixes: str, but: tuple[str, ...] = ()) -> list[Path]:
    """The files of the modules named by ``prefixes`` (a package, a wing, a module), less those ``but`` names."""
    def within(name: str, names: tuple[str, ...]) -> bool:
        return any(name == p or name.startswith(p + ".") for p in names)

    return [path for name, path in MODULES.items() if within(name, prefixes) and not within(name, but)]


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("udf_engine", ("arrow_bridge", "sql_magics", "duckdb", "IPython")),  # the engine knows nothing of SQL
        ("arrow_bridge", ("sql_magics", "IPython")),  # the bridge knows nothing of Jupyter
    ],
)
def test_packages_depend_one_way(package, forbidden):
    offenders = {module_name(p): imports_any(p, forbidden) for p in files(package)}
    assert {name: found for name, found in offenders.items() if found} == {}


SQL = "sql_magics"
# The surface calls these; they never import it: the executor side never reaches back into the Session.
SURFACE = (f"{SQL}.session", f"{SQL}.front")
TOP = (f"{SQL}.executor", f"{SQL}.commands", *SURFACE)
WINGS = tuple(f"{SQL}.{wing}" for wing in ("language", "tables", "models", "planner", "byzer", "serving", "streaming", "front"))
MODES = (f"{SQL}.serving", f"{SQL}.streaming")
WING_RULES = {
    # the ground every wing may stand on
    f"{SQL}.errors": (*WINGS, f"{SQL}.state", f"{SQL}.handoff", *TOP),
    f"{SQL}.handoff": (*WINGS, f"{SQL}.state", f"{SQL}.errors", *TOP),
    f"{SQL}.state": (*(w for w in WINGS if w != f"{SQL}.language"), *TOP),
    # each wing, lowest first, and what it must not import: the wings above it and the top
    f"{SQL}.language": (f"{SQL}.state", f"{SQL}.tables", f"{SQL}.models", f"{SQL}.planner", f"{SQL}.byzer", *MODES, *TOP),
    f"{SQL}.tables": (f"{SQL}.models", f"{SQL}.planner", f"{SQL}.byzer", *MODES, *TOP),
    f"{SQL}.planner": (f"{SQL}.models", f"{SQL}.byzer", *MODES, *TOP),
    f"{SQL}.byzer": (f"{SQL}.models", f"{SQL}.planner", *MODES, *TOP),
    f"{SQL}.models": (f"{SQL}.planner", *MODES, *TOP),
    # the web-service and streaming modes: over the models and their tables, and not over each other
    f"{SQL}.serving": (f"{SQL}.planner", f"{SQL}.streaming", *TOP),
    f"{SQL}.streaming": (f"{SQL}.planner", f"{SQL}.serving", *TOP),
    f"{SQL}.executor": SURFACE,
    f"{SQL}.commands": (f"{SQL}.executor", *SURFACE),
    "udf_engine.models": ("udf_engine.actors", "udf_engine.byzer"),
    "udf_engine.actors": ("udf_engine.byzer",),
    **{f"udf_engine.{base}": ("udf_engine.models", "udf_engine.actors", "udf_engine.byzer") for base in
       ("errors", "settings", "ray_runtime", "resources", "durable", "paths")},
}


@pytest.mark.parametrize("wing", WING_RULES)
def test_wings_import_only_the_wings_below_them(wing):
    offenders = {module_name(p): imports_any(p, WING_RULES[wing]) for p in files(wing)}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_a_share_scan_in_a_worker_imports_no_function_lifecycle_nor_dispatcher():
    """A worker reading its share imports what scoring needs, not the registration side."""
    code = "import sys, arrow_bridge.share_scan; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    unwanted = ("arrow_bridge.function", "udf_engine.actors.dispatcher", "udf_engine.actors.builder", "udf_engine.actors.master")
    assert "arrow_bridge.scoring" in loaded and [m for m in unwanted if m in loaded] == []


def test_no_module_outside_the_engines_actors_makes_a_dispatcher():
    """Rows reach the workers one way (RemoteUDF.score, RemoteUDF.attach): nobody else builds a data plane."""
    makers = {
        module_name(path) for path in files(*PACKAGES, but=("udf_engine.actors",))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Dispatcher"
    }
    assert makers == set()


def test_nothing_imports_the_fronts():
    # IPython finds load_ipython_extension in the package itself: its __init__ hands on to the magics.
    offenders = {module_name(p): imports_any(p, (f"{SQL}.front",)) for p in files(*PACKAGES, but=(f"{SQL}.front", SQL))}
    assert {name: found for name, found in offenders.items() if found} == {}
    assert imports_any(MODULES[SQL], (f"{SQL}.front",)) == [f"{SQL}.front.magics", f"{SQL}.front.magics.SqlMagic"]


def test_no_modules_import_each_other_in_a_circle():
    graph = {name: project_imports(path) - {name} for name, path in MODULES.items()}
    done: set[str] = set()

    def circle_from(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return [*path[path.index(name):], name]
        if name in done:
            return None
        for target in sorted(graph[name]):
            if found := circle_from(target, [*path, name]):
                return found
        done.add(name)
        return None

    circles = [c for name in sorted(graph) if (c := circle_from(name, []))]
    assert circles == []


def test_a_mode_plugs_into_the_executor_which_does_not_branch_on_it():
    """SPEC §2: the executor asks its modes whether they claim a statement; of the streaming wing it knows the
    mode and the session's streams (for !streams), none of a stream's parts (drafts, sources, options)."""
    from sql_magics.executor import MODES
    from sql_magics.streaming.mode import StreamMode

    streaming = {n for n in project_imports(MODULES[f"{SQL}.executor"]) if n.startswith(f"{SQL}.streaming")}
    assert streaming == {f"{SQL}.streaming.mode", f"{SQL}.streaming.streams"}
    assert StreamMode in MODES


def test_every_wing_is_a_package_with_a_docstring():
    wings = [p for package in PACKAGES for p in (ROOT / package).iterdir() if p.is_dir() and p.name != "__pycache__"]
    assert wings  # the packages have wings
    for wing in wings:
        assert ast.get_docstring(ast.parse((wing / "__init__.py").read_text())), wing
