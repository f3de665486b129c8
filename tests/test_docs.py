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
from sql_magics.models.options import REGISTER_OPTIONS, SCRIPT_OPTIONS
from udf_engine.models.loaders import FORMAT_OPTIONS, MODEL_OPTIONS
from udf_engine.settings import OPTIONS, Option

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
    """A default as the docs write it: 1 for 1.0, {} for an empty dict, none for None, true for True."""
    if isinstance(default, bool):
        return str(default).lower()
    return f"{default:g}" if isinstance(default, float) else "none" if default is None else str(default)


def row(option: Option) -> str:
    """An option's row in the docs' option tables: | `name` (alias `a`) | default | help |."""
    aliases = "".join(f" (alias `{alias}`)" for alias in option.aliases)
    return f"| `{option.name}`{aliases} | {shown(option.default)} | {option.help} |"


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_every_engine_option_is_documented_as_the_code_has_it(option):
    assert row(option) in STATEMENTS_DOC


REGISTRATION_TABLES = [*REGISTER_OPTIONS, *MODEL_OPTIONS, *(o for table in FORMAT_OPTIONS.values() for o in table), *SCRIPT_OPTIONS]


@pytest.mark.parametrize("option", REGISTRATION_TABLES, ids=lambda o: o.name)
def test_every_registration_and_model_option_is_documented_as_the_code_has_it(option):
    assert row(option) in STATEMENTS_DOC


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
    for option in (*STREAM_OPTIONS, *DeltaSink.OPTIONS, *ConsoleSink.OPTIONS, *DeltaSource.OPTIONS, *MockSource.OPTIONS):
        assert f"`{option.name}" in streaming_doc, option.name
    for fmt in (*SINK_FORMATS, MOCK_FORMAT):
        assert f"{fmt}.`" in streaming_doc, fmt
    assert f"`maxFilesPerTrigger` (default {MAX_FILES_PER_TRIGGER})" in streaming_doc
    assert f"!streams;                        -- {', '.join(STREAM_COLUMNS)}" in streaming_doc
    assert f"!streams;                       -- the session's streams (see streaming.md): {', '.join(STREAM_COLUMNS)}" in STATEMENTS_DOC


def option_tables() -> list[tuple[str, str, tuple[Option, ...]]]:
    """(doc, place, table) of every place that takes load, save or stream options."""
    from sql_magics.streaming.query import STREAM_OPTIONS
    from sql_magics.streaming.sinks import ConsoleSink, DeltaSink
    from sql_magics.streaming.sources import DeltaSource, FileSource, MockSource
    from sql_magics.tables.lake import LOAD_OPTIONS, SAVE_OPTIONS

    return [
        ("statements.md", "load delta", LOAD_OPTIONS),
        ("statements.md", "save delta", SAVE_OPTIONS),
        ("streaming.md", "stream save", STREAM_OPTIONS),
        ("streaming.md", "file source", FileSource.OPTIONS),
        ("streaming.md", "delta source", DeltaSource.OPTIONS),
        ("streaming.md", "mockStream source", MockSource.OPTIONS),
        ("streaming.md", "delta sink", DeltaSink.OPTIONS),
        ("streaming.md", "console sink", ConsoleSink.OPTIONS),
    ]


@pytest.mark.parametrize(("doc", "table"), [(doc, table) for doc, _, table in option_tables()], ids=[p for _, p, _ in option_tables()])
def test_every_load_save_and_stream_option_table_is_documented_as_the_code_has_it(doc, table):
    """Each table is one table of the docs: its rows, in its order, each with its default and help."""
    text = (ROOT / "docs" / doc).read_text()
    assert "\n".join(row(option) for option in table) in text


def test_serving_md_lists_the_serve_options_as_the_code_has_them():
    """The options table of docs/serving.md is SERVE_OPTIONS, row for row: what `rayudf serve`, `!serve` and Session.serve take."""
    from sql_magics.serving.options import SERVE_OPTIONS

    serving_doc = (ROOT / "docs" / "serving.md").read_text()
    section = serving_doc.split("## Starting and stopping")[1].split("\n## ")[0]
    rows = re.findall(r"^\| `(\w+)` \| (.*?) \| (.*) \|$", section, flags=re.MULTILINE)
    written = [(o.name, str(o.default).lower() if isinstance(o.default, bool) else shown(o.default), o.help) for o in SERVE_OPTIONS]
    assert rows == written


def test_every_serve_option_is_a_flag_a_keyword_and_a_field():
    from dataclasses import fields
    from inspect import signature

    from click.testing import CliRunner

    from sql_magics.front.cli import main
    from sql_magics.serving.options import SERVE_OPTIONS, ServeOptions
    from sql_magics.session import Session

    names = [o.name for o in SERVE_OPTIONS]
    assert [f.name for f in fields(ServeOptions)] == names
    assert [p for p in signature(Session.serve).parameters if p != "self"] == names
    usage = " ".join(CliRunner().invoke(main, ["serve", "--help"]).output.split())
    for option in SERVE_OPTIONS:
        assert f"--{option.name.replace('_', '-')}" in usage and " ".join(option.help.split()) in usage, option.name


# -- links ------------------------------------------------------------------------------

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", flags=re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", flags=re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """The text without fenced blocks and code spans: what a link or a heading can be."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lowercase, punctuation dropped, spaces to dashes; repeats get -1, -2."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", FENCE.sub("", text), flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def test_anchors_follow_githubs_rule():
    text = "\n".join([
        "# Scaling: who reads the rows",
        "## Warm pools: registering the next model",
        "```sh", "# a comment, not a heading", "```",
        "## Options (`%config SqlMagic.<option> = <value>`)",
        "## Speed", "## Speed",
    ])
    assert anchors(text) == {
        "scaling-who-reads-the-rows", "warm-pools-registering-the-next-model", "options-config-sqlmagicoption--value", "speed", "speed-1",
    }


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_a_file_and_heading_that_exist(page):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"](docs/{page.name})" in readme, page.name
