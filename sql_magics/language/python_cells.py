"""Byzer notebook's Python cells: a cell whose first line is ``#%python`` is a ``run command as Ray``.

The ``#%`` lines right after it are directives: ``#%input=<table>`` (default: none),
``#%output=<table>`` (default ``output``, which also shows the rows), ``#%schema=...``,
and Byzer's ``#%dataMode``, ``#%cache``, ``#%runIn``, ``#%pythonExec``, ``#%env`` (accepted;
the code runs in this process, so ``env`` and ``pythonExec`` change nothing). The rest of
the cell is the code. So a Byzer notebook's Python cell pastes into ``%%sql`` unchanged.

Example:
    >>> run = python_cell("#%python\\n#%input=t\\n#%output=o\\n#%schema=st(field(a,long))\\ncontext.build_result([])")
    >>> run.table, run.output, run.options["schema"], run.options["code"]
    ('t', 'o', 'st(field(a,long))', 'context.build_result([])')
    >>> python_cell("select 1") is None
    True
"""

from __future__ import annotations

from sql_magics.language.statements import NO_INPUT, OUTPUT_TABLE, PYTHON_ENV, RAY, Run
from sql_magics.language.tokens import parse_error

MARKER = "#%python"
# Directive -> option of the run statement.
DIRECTIVES = {
    "input": "inputTable",
    "output": "outputTable",
    "schema": "schema",
    "dataMode": "dataMode",
    "cache": "cache",
    "runIn": "runIn",
    "pythonExec": "pythonExec",
    "env": PYTHON_ENV,  # what Byzer's `!python env "PYTHON_ENV=..."` sets
}


def python_cell(text: str, source_name: str = "") -> Run | None:
    """The ``run`` statement a ``#%python`` cell stands for; None for any other text."""
    lines = text.split("\n")
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None or lines[first].strip() != MARKER:
        return None
    options: dict[str, str] = {}
    body = first + 1
    while body < len(lines) and lines[body].startswith("#%"):
        key, eq, value = lines[body][2:].partition("=")
        if not eq or key.strip() not in DIRECTIVES:
            known = ", ".join(f"#%{name}=" for name in DIRECTIVES)
            raise parse_error(text, f"python cell: unknown directive {lines[body].strip()!r} (known: {known})", body + 1, 1, source_name)
        options[DIRECTIVES[key.strip()]] = value.strip()
        body += 1
    options["code"] = "\n".join(lines[body:])
    output = options.pop("outputTable", "") or OUTPUT_TABLE
    table = options.pop("inputTable", "") or NO_INPUT
    return Run(table, RAY, "", options, output, text=text, line=first + 1, col=1)
