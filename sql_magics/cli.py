"""The ``rayudf`` command line: one click group.

Example:
    $ rayudf demo --workdir demo_data --output out/scored.parquet
"""

from __future__ import annotations

import click

from udf_engine.errors import RayUDFError


@click.group()
def main() -> None:
    """rayudf: score DuckDB SQL with models held by Ray actors."""


@main.command()
@click.option("--workdir", default="demo_data", show_default=True, help="where the demo model and table go")
@click.option("--output", default="out/scored.parquet", show_default=True, help="where the scored table goes")
def demo(workdir: str, output: str) -> None:
    """Train a digits model, register it on 2 Ray workers and score a Parquet table through SQL."""
    from sql_magics.demo import run_demo

    try:
        run_demo(workdir, output, echo=click.echo)
    except RayUDFError as err:
        raise click.ClickException(str(err)) from None
