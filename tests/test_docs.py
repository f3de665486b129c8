"""Documentation stays true: every statement kind, register kind, command and option is
documented, and the runnable examples in module docstrings run."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

from sql_magics.commands import COMMANDS
from sql_magics.registration import REGISTER_KINDS
from sql_magics.statements import STATEMENT_TYPES
from udf_engine.settings import OPTIONS

ROOT = Path(__file__).resolve().parents[1]
STATEMENTS_DOC = (ROOT / "docs" / "statements.md").read_text()


def test_every_statement_kind_has_a_section():
    headings = set(re.findall(r"^## (\w+)", STATEMENTS_DOC, flags=re.MULTILINE))
    assert {t.kind for t in STATEMENT_TYPES} <= headings


@pytest.mark.parametrize("kind", REGISTER_KINDS)
def test_every_register_kind_is_documented(kind):
    assert f"`{kind}`" in STATEMENTS_DOC


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_is_documented(command):
    assert f"!{command}" in STATEMENTS_DOC


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_every_engine_option_is_documented(option):
    assert f"| `{option.name}`" in STATEMENTS_DOC
    for alias in option.aliases:
        assert f"`{alias}`" in STATEMENTS_DOC


def test_readme_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```")[1]
    assert [line.split("#")[0].strip() for line in first_block.strip().splitlines()[1:3]] == ["make demo", "make test"]


DOCTESTED = [
    "udf_engine.errors",
    "udf_engine.settings",
    "udf_engine.model_store",
    "udf_engine.builtin_funcs",
    "arrow_bridge.types",
    "arrow_bridge.tensors",
    "sql_magics.errors",
    "sql_magics.variables",
    "sql_magics.dialect",
    "sql_magics.formats",
    "sql_magics.catalog",
    "sql_magics.executor",
    "sql_magics.progress",
]


@pytest.mark.parametrize("module", DOCTESTED)
def test_docstring_examples_run(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_every_magic_option_is_documented():
    from sql_magics.magics import SqlMagic

    jupyter_doc = (ROOT / "docs" / "jupyter.md").read_text()
    options = SqlMagic.class_own_traits(config=True)
    assert options  # the magic has options to document
    for name, trait in options.items():
        assert f"| `{name}` | {trait.default_value}" in jupyter_doc, name
