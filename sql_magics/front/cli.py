"""The ``rayudf`` command line: one click group.

Exit codes of ``rayudf run``: 0 done, 1 a statement failed, 2 the script does not
parse (nothing ran) or the command line is wrong. User mistakes print one line on
stderr; ``--debug`` shows the traceback instead.

Example:
    $ rayudf run examples/digits_score.sql --set rows=100 --limit 5
    $ rayudf demo
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from udf_engine.errors import RayUDFError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _Failed(click.ClickException):
    """A one-line error with its own exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _parse_sets(values: tuple[str, ...]) -> dict[str, str]:
    pairs = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--set {item!r}: expected key=value")
        pairs[key] = value
    return pairs


@click.group()
def main() -> None:
    """rayudf: score DuckDB SQL with models held by Ray actors."""


@main.command()
@click.argument("script", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="set ${KEY}; wins over the script's own set")
@click.option("--ray-address", default=None, help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
@click.option("--limit", default=20, show_default=True, help="rows of the last result to print (0: all)")
@click.option("--debug", is_flag=True, help="show tracebacks")
def run(script: Path, sets: tuple[str, ...], ray_address: str | None, limit: int, debug: bool) -> None:
    """Run a script of statements and print the last result as a table."""
    from sql_magics.errors import ParseError
    from sql_magics.session import Session

    variables = _parse_sets(sets)
    try:
        text = script.read_text()
    except OSError as err:
        raise _Failed(f"{script}: {err.strerror}", 2) from None
    try:
        with Session(ray_address=ray_address) as session:
            session.pin_variables(variables)
            result = session.run(text, source_name=str(script), base_dir=script.parent)
            for warning in result.warnings:
                click.echo(f"warning: {warning}", err=True)
            frame = result.frame
            if frame is not None:
                shown = frame if limit <= 0 else frame.head(limit)
                click.echo(shown.to_string(index=False))
                if len(shown) < len(frame):
                    click.echo(f"... {len(frame)} rows, {limit} shown")
            elif result.notice:
                click.echo(result.notice)
    except ParseError as err:
        if debug:
            raise
        raise _Failed(str(err), 2) from None
    except RayUDFError as err:
        if debug:
            raise
        raise _Failed(str(err), 1) from None


@main.command()
@click.option("--workdir", default="demo_data", show_default=True, help="where the demo model and table go")
@click.option("--output", default="out/scored.parquet", show_default=True, help="where the scored table goes")
def demo(workdir: str, output: str) -> None:
    """Train a digits model, register it on 2 Ray workers and score a Parquet table through SQL."""
    from sql_magics.front.demo import run_demo

    try:
        run_demo(workdir, output, echo=click.echo)
    except RayUDFError as err:
        raise _Failed(str(err), 1) from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
