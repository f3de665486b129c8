"""Documentation stays true: every statement kind, register kind, command and option is
documented, with the default the code uses. (The runnable examples in docstrings run as
doctests: pytest collects them from every module, see pyproject.toml.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sql_magics.commands import COMMANDS, MODEL_COLUMNS, WORKER_COLUMNS
from sql_magics.language.statements import STATEMENT_TYPES
from sql_magics.models.kinds import REGISTER_KINDS
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


@pytest.mark.parametrize(("command", "columns"), [("workers", WORKER_COLUMNS), ("models", MODEL_COLUMNS)])
def test_command_tables_are_documented_column_by_column(command, columns):
    assert re.search(rf"^!{command};\s+-- {re.escape(', '.join(columns))}$", STATEMENTS_DOC, flags=re.MULTILINE)


def shown(default: object) -> str:
    """A default as the docs write it: 1 for 1.0, {} for an empty dict, none for None."""
    return f"{default:g}" if isinstance(default, float) else "none" if default is None else str(default)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_every_engine_option_is_documented_as_the_code_has_it(option):
    aliases = "".join(f" (alias `{alias}`)" for alias in option.aliases)
    assert f"| `{option.name}`{aliases} | {shown(option.default)} | {option.help} |" in STATEMENTS_DOC


def test_every_engine_option_is_a_setting():
    from dataclasses import fields

    from udf_engine.settings import UDFConf

    assert [f.name for f in fields(UDFConf)] == [o.name for o in OPTIONS] + ["extra"]
    assert {o.name: getattr(UDFConf(), o.name) for o in OPTIONS} == {o.name: o.default for o in OPTIONS}


def test_readme_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```")[1]
    assert [line.split("#")[0].strip() for line in first_block.strip().splitlines()[1:3]] == ["make demo", "make test"]


def test_every_magic_option_is_documented():
    from sql_magics.front.magics import SqlMagic

    jupyter_doc = (ROOT / "docs" / "jupyter.md").read_text()
    options = SqlMagic.class_own_traits(config=True)
    assert options  # the magic has options to document
    for name, trait in options.items():
        assert f"| `{name}` | {trait.default_value}" in jupyter_doc, name


def test_every_stream_option_source_sink_and_column_is_in_streaming_md():
    from sql_magics.streaming.query import STREAM_OPTIONS
    from sql_magics.streaming.sinks import SINK_FORMATS, ConsoleSink, DeltaSink
    from sql_magics.streaming.sources import MAX_FILES_PER_TRIGGER, MOCK_FORMAT, DeltaSource, MockSource
    from sql_magics.streaming.streams import STREAM_COLUMNS

    streaming_doc = (ROOT / "docs" / "streaming.md").read_text()
    for name in (*STREAM_OPTIONS, *DeltaSink.OPTIONS, *ConsoleSink.OPTIONS, *DeltaSource.OPTIONS, *MockSource.OPTIONS):
        assert f"`{name}" in streaming_doc, name
    for fmt in (*SINK_FORMATS, MOCK_FORMAT):
        assert f"{fmt}.`" in streaming_doc, fmt
    assert f"`maxFilesPerTrigger` (default {MAX_FILES_PER_TRIGGER})" in streaming_doc
    assert f"!streams;                        -- {', '.join(STREAM_COLUMNS)}" in streaming_doc
    assert f"!streams;                       -- the session's streams (see streaming.md): {', '.join(STREAM_COLUMNS)}" in STATEMENTS_DOC
