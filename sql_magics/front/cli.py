"""The ``rayudf`` command line: one click group.

Exit codes of ``rayudf run``: 0 done, 1 a statement failed, 2 the script does not
parse (nothing ran) or the command line is wrong. User mistakes print one line on
stderr; ``--debug`` shows the traceback instead.

Example:
    $ rayudf run examples/digits_score.sql --set rows=100 --limit 5
    $ rayudf run examples/stream_scores.sql      # a stream script: runs until SIGINT/SIGTERM
    $ rayudf serve examples/serve_digits.sql --port 8000
    $ rayudf deploy examples/serve_digits.sql --ray-address 10.0.0.5:6379 --host 0.0.0.0 --token-file token
    $ rayudf demo
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from sql_magics.errors import ParseError
from sql_magics.serving.options import SERVE_OPTIONS, TOKEN_VARIABLE, read_serve_options
from sql_magics.serving.server import check_binding
from udf_engine.errors import ConfigError, RayUDFError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# How often `rayudf serve` and a stream script's `rayudf run` look whether they were signalled to stop.
_SIGNAL_POLL_S = 0.2


class _Failed(click.ClickException):
    """A one-line error with its own exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _read(script: Path) -> str:
    try:
        return script.read_text()
    except OSError as err:
        raise _Failed(f"{script}: {err.strerror}", 2) from None


@contextmanager
def _statement_errors(debug: bool) -> Iterator[None]:
    """A script's error as one line and an exit code: 2 when it does not parse (nothing ran), 1 when a statement failed."""
    try:
        yield
    except ParseError as err:
        if debug:
            raise
        raise _Failed(str(err), 2) from None
    except RayUDFError as err:
        if debug:
            raise
        raise _Failed(str(err), 1) from None


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
    """Run a script of statements and print the last result as a table. A stream script
    (docs/streaming.md) prints a line per micro-batch and runs until SIGINT or SIGTERM, which
    let the batch in progress commit; a stream that fails exits 1 with its error."""
    from sql_magics.session import Session

    variables, text = _parse_sets(sets), _read(script)
    with _statement_errors(debug), Session(ray_address=ray_address, warm=None if _registers(text) else False) as session:
        session.streams.progress = True
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
        if session.streams.running() or session.streams.failed():  # one may have failed already
            _run_streams(session.streams)


def _run_streams(streams) -> None:
    """Wait while the script's streams run; on SIGINT or SIGTERM, stop them after their batch in progress."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # after Ray's start, which puts a handler of its own on SIGTERM
        signal.signal(signum, lambda *_: stop.set())
    while streams.running() and not stop.wait(_SIGNAL_POLL_S):
        pass
    if stop.is_set():
        click.echo("stopping: each stream commits its batch in progress", err=True)
    streams.close()
    if failed := streams.failed():
        raise _Failed("; ".join(f"stream {query.name}: {query.last_error}" for query in failed), 1)


def _registers(text: str) -> bool:
    """Whether a script may register a model (``register``, or an ``include`` that might), so that
    its session warms spares ahead (the default) while the statements before run; other scripts
    start no Ray they would not use. A script that does not parse warms nothing: it runs nothing."""
    from sql_magics.language.parser import parse

    try:
        return any(statement.kind in ("register", "include") for statement in parse(text))
    except ParseError:
        return False


# What `rayudf serve`'s flag of a serve option says besides the option's own help.
_FLAG_NOTES = {"token": "; on the command line it shows in the process list: prefer --token-file"}


def _serve_flags(command: Callable) -> Callable:
    """A flag for each serve option (``--request-timeout-s`` for ``request_timeout_s``), in SERVE_OPTIONS's order."""
    for option in reversed(SERVE_OPTIONS):  # click lists the flags in the order the decorators are applied, last first
        flag, text = "--" + option.name.replace("_", "-"), option.help + _FLAG_NOTES.get(option.name, "")
        if option.type is bool:
            command = click.option(flag, option.name, is_flag=True, default=option.default, help=text)(command)
        else:
            shown = option.default is not None
            command = click.option(flag, option.name, type=option.type, default=option.default, show_default=shown, help=text)(command)
    return command


@main.command()
@click.argument("script", type=click.Path(dir_okay=False, path_type=Path))
@_serve_flags
@click.option("--token-file", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="read the token from this file (its first line)")
@click.option("--ray-address", default=None, help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="set ${KEY}; wins over the script's own set")
@click.option("--debug", is_flag=True, help="show tracebacks")
def serve(
    script: Path, token_file: Path | None, ray_address: str | None, sets: tuple[str, ...], debug: bool, **options: object
) -> None:
    """Run a script (its register, load and set statements), then answer HTTP for its functions
    until SIGINT or SIGTERM, which let the requests in flight finish (docs/serving.md)."""
    from sql_magics.session import Session

    options["token"] = _token(click.get_current_context(), options["token"], token_file)
    try:
        settings = read_serve_options(options)
        check_binding(settings.host, settings.token, settings.allow_scripts)  # before the script runs: nothing starts that would not serve
    except ConfigError as err:
        raise _Failed(str(err), 2) from None
    variables, text = _parse_sets(sets), _read(script)
    stop = threading.Event()
    with _statement_errors(debug), Session(ray_address=ray_address) as session:
        session.registry.runtime.ensure()
        for signum in (signal.SIGINT, signal.SIGTERM):  # after Ray's start, which puts a handler of its own on SIGTERM
            signal.signal(signum, lambda *_: stop.set())
        session.pin_variables(variables)
        for warning in session.run(text, source_name=str(script), base_dir=script.parent).warnings:
            click.echo(f"warning: {warning}", err=True)
        handle = session.serve(**options)
        click.echo(repr(handle))
        while not stop.wait(_SIGNAL_POLL_S):
            pass
        click.echo("stopping: the requests in flight finish", err=True)


@main.command()
@click.argument("script", required=False, type=click.Path(dir_okay=False, path_type=Path))
@_serve_flags
@click.option("--token-file", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="read the token from this file (its first line)")
@click.option("--ray-address", default=None, help="the Ray cluster (default: RAY_ADDRESS)")
@click.option("--name", default=None, help="the Serve application's name (default: the script's file name without .sql)")
@click.option("--route-prefix", default="/", show_default=True, help="the app's URL path on Serve's proxy")
@click.option("--status", "show_status", is_flag=True, help="list the apps deployed on the cluster, and stop")
@click.option("--delete", "delete_name", default=None, metavar="NAME", help="delete the app NAME, and stop")
@click.option("--debug", is_flag=True, help="show tracebacks")
def deploy(
    script: Path | None, token_file: Path | None, ray_address: str | None, name: str | None, route_prefix: str,
    show_status: bool, delete_name: str | None, debug: bool, **options: object,
) -> None:
    """Put a script's functions on a Ray cluster as a Ray Serve application that outlives this command:
    it returns once the app answers (docs/serving.md, "Deploying on a cluster"). Deploying a changed
    script to a running app swaps its functions with no failed request."""
    from sql_magics.front import deploy as deploying
    from udf_engine.ray_runtime import RayRuntime

    if sum((script is not None, show_status, delete_name is not None)) != 1:
        raise click.UsageError("give a SCRIPT to deploy, --status or --delete NAME (one of them)")
    if not (ray_address or os.environ.get("RAY_ADDRESS")):
        raise _Failed("deploy: give the Ray cluster (--ray-address or RAY_ADDRESS): an app on a Ray of this command's would end with it", 2)
    args: dict[str, object] = {}
    if script is not None:
        options["token"] = _token(click.get_current_context(), options["token"], token_file)
        args = {**{k: v for k, v in options.items() if v is not None}, "script": _read(script), "base_dir": str(script.resolve().parent)}
        try:
            deploying.DeployArgs.of(args)  # the script and options checked before anything starts
        except (ConfigError, ParseError) as err:
            raise _Failed(str(err), 2) from None
    with _statement_errors(debug):
        RayRuntime(ray_address).ensure()
        if show_status:
            for row in deploying.deployed():
                click.echo(f"{row['name']}\t{row['status']}\t{row['functions']}" + (f"\t{row['error']}" if row["error"] else ""))
            return
        if delete_name is not None:
            deploying.undeploy(delete_name)
            click.echo(f"deleted {delete_name}")
            return
        click.echo(str(deploying.deploy(name or script.stem, args, route_prefix)))


def _token(context: click.Context, token: str | None, token_file: Path | None) -> str | None:
    """The server's token: from --token-file, else --token (a warning: every user of the machine can read
    it in /proc/<pid>/cmdline); None leaves it to $RAYUDF_TOKEN (read_serve_options)."""
    typed = context.get_parameter_source("token") is click.core.ParameterSource.COMMANDLINE
    if token_file is None:
        if typed:
            click.echo(f"warning: --token shows in the process list; prefer --token-file or {TOKEN_VARIABLE}", err=True)
        return token
    if typed:
        raise click.UsageError("give --token or --token-file, not both")
    try:
        lines = token_file.read_text().splitlines()
    except OSError as err:
        raise _Failed(f"--token-file {token_file}: {err.strerror}", 2) from None
    if not lines or not lines[0].strip():
        raise _Failed(f"--token-file {token_file}: the file is empty; its first line is the token", 2)
    return lines[0].strip()


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
