"""IPython magics: ``%sql`` (one statement) and ``%%sql`` (a script), one Session per kernel.

The magic only parses its own line, calls the Session and displays what comes back.

Example (in a notebook):
    %load_ext sql_magics
    %config SqlMagic.displaylimit = 10

    %%sql scored <<
    load parquet.`data/digits.parquet` as digits;
    register keras.`models/digits.keras` as digit where workers="2";
    select id, digit(pixels) as probs from digits where id < $limit as output;
"""

from __future__ import annotations

import atexit
import html
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class, needs_local_scope, no_var_expand
from traitlets import Bool, Float, Int

from arrow_bridge.frames import scannable
from sql_magics.errors import ParseError
from sql_magics.executor import ScriptResult
from sql_magics.front.progress import QueryInterrupted, run_with_progress
from sql_magics.language.variables import parameter_names
from sql_magics.session import Session
from sql_magics.tables.catalog import relation_kind
from udf_engine.errors import RayUDFError

_STORE = re.compile(r"^\s*([A-Za-z_]\w*)\s*<<\s*(.*)$", re.DOTALL)
_NAME = re.compile(r"[A-Za-z_]\w*")  # any word of a cell that may name a notebook object


def _is_table_like(value: Any) -> bool:
    """pandas DataFrames and Arrow tables/readers, the objects DuckDB can scan by name."""
    if isinstance(value, pd.DataFrame):
        return True
    module = type(value).__module__ or ""
    return module.startswith("pyarrow") and type(value).__name__ in ("Table", "RecordBatchReader", "RecordBatch", "Dataset")


@dataclass
class SqlResult:
    """A query's rows and how long it took; shows at most ``limit`` rows."""

    df: pd.DataFrame
    elapsed_s: float
    limit: int

    def DataFrame(self) -> pd.DataFrame:  # noqa: N802 - the name JupySQL users know
        """The full result."""
        return self.df

    def __len__(self) -> int:
        return len(self.df)

    def _footer(self) -> str:
        rows, cols = self.df.shape
        shown = f" (first {self.limit} shown)" if rows > self.limit else ""
        plural = lambda n, word: f"{n:,} {word}{'' if n == 1 else 's'}"  # noqa: E731
        return f"{plural(rows, 'row')} × {plural(cols, 'column')} · {self.elapsed_s:.2f} s{shown}"

    def _repr_html_(self) -> str:
        table = self.df.head(self.limit).to_html(index=False, max_cols=50, border=0)
        return f'{table}<p class="rayudf-footer">{html.escape(self._footer())}</p>'

    def __repr__(self) -> str:
        return f"{self.df.head(self.limit).to_string(index=False)}\n{self._footer()}"


@magics_class
class SqlMagic(Magics):
    """``%sql`` / ``%%sql``: the rayudf statement language in IPython and Jupyter."""

    displaylimit = Int(20, config=True, help="rows of a result shown in the notebook (the stored DataFrame is whole)")
    short_errors = Bool(True, config=True, help="show errors as one line (False: the full traceback)")
    progress_after_s = Float(1.0, config=True, help="seconds a query runs before a progress bar appears")
    progress = Bool(True, config=True, help="show a progress bar for queries that run longer than progress_after_s")

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self._session: Session | None = None
        self._registered: set[str] = set()  # notebook objects registered into DuckDB by name
        atexit.register(self.close)  # kernel shutdown stops the workers

    @property
    def session(self) -> Session:
        """The kernel's Session, made on first use."""
        if self._session is None:
            self._session = Session()
            self._registered = set()
        return self._session

    def close(self) -> None:
        """Stop the session's workers (and its local Ray, if it started one)."""
        if self._session is not None:
            session, self._session = self._session, None
            session.close()

    @no_var_expand
    @needs_local_scope
    @line_cell_magic
    def sql(self, line: str = "", cell: str | None = None, local_ns: dict | None = None) -> SqlResult | None:
        """Run a statement (``%sql``) or a script (``%%sql``); ``%%sql name <<`` stores the DataFrame."""
        if line.strip() == "--close":
            self.close()
            return None
        target, text = self._split_line(line, cell)
        if not text.strip():
            raise UsageError("%sql: nothing to run")
        namespace = {**self.shell.user_ns, **(local_ns or {})}
        started = time.perf_counter()
        result = self._run(text, namespace)
        elapsed = time.perf_counter() - started
        for warning in result.warnings:
            print(warning, file=sys.stderr)
        if result.frame is None and result.notice:
            print(result.notice)
        if target:
            self.shell.user_ns[target] = result.frame
            return None
        return None if result.frame is None else SqlResult(result.frame, elapsed, self.displaylimit)

    @staticmethod
    def _split_line(line: str, cell: str | None) -> tuple[str | None, str]:
        store = _STORE.match(line)
        if cell is None:
            return (store.group(1), store.group(2)) if store else (None, line)
        if store and not store.group(2).strip():
            return store.group(1), cell
        if line.strip():
            raise UsageError(f"%%sql: unexpected {line.strip()!r} on the magic's line (use '%%sql name <<' to store the result)")
        return None, cell

    def _run(self, text: str, namespace: dict) -> ScriptResult:
        session = self.session
        self._register_frames(text, namespace)
        parameters = {name: namespace[name] for name in parameter_names(text) if name in namespace}
        try:
            return run_with_progress(
                lambda: session.run(text, parameters=parameters),
                session.con,
                rows_scored=lambda: session.rows_scored,
                after_s=self.progress_after_s,
                show=self.progress,
            )
        except ParseError as err:
            if not self.short_errors:
                raise
            raise UsageError(err.highlight()) from None
        except (RayUDFError, QueryInterrupted) as err:
            if not self.short_errors:
                raise
            raise UsageError(str(err)) from None

    def _register_frames(self, text: str, namespace: dict) -> None:
        """Make notebook DataFrames and Arrow tables named in the text queryable by that name."""
        db = self.session.db
        tables = {name: value for name in set(_NAME.findall(text)) if _is_table_like(value := namespace.get(name))}
        with db.exclusive():  # a query another thread runs on the session must not be in the way
            for name, value in tables.items():
                if name not in self._registered and relation_kind(db.con, name):
                    continue  # a DuckDB table or view of that name wins over the notebook object
                db.con.register(name, scannable(value) if isinstance(value, pd.DataFrame) else value)
                self._registered.add(name)
