"""Run a query on a background thread, with a progress bar for slow ones and Ctrl-C that cancels.

The calling thread only waits: it draws a tqdm bar (a widget in JupyterLab, text in a
terminal) once the query has run for ``after_s`` seconds, showing DuckDB's percentage,
the rows scored by model functions and rows/s; on KeyboardInterrupt it interrupts
DuckDB and waits for the query to stop, so the session and its workers stay usable.
While it waits it also runs what the query hands it (:mod:`sql_magics.handoff`: Ray's start).

Example:
    >>> import duckdb
    >>> con = duckdb.connect()
    >>> run_with_progress(lambda: con.sql("select 42").fetchall(), con, rows_scored=lambda: 0, after_s=1.0)
    [(42,)]
    >>> from sql_magics.handoff import on_waiting_thread
    >>> run_with_progress(lambda: on_waiting_thread(threading.current_thread).name, con, rows_scored=lambda: 0, after_s=1.0)
    'MainThread'
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from sql_magics.handoff import Handoff

# How often the bar is redrawn; also how quickly a finished query, or a call handed to
# the waiting thread, is noticed.
_TICK_S = 0.1


class QueryInterrupted(Exception):  # noqa: N818 - named for what happened, as KeyboardInterrupt is
    """The user interrupted a running query; it was cancelled."""


def _bar():
    from tqdm.auto import tqdm

    return tqdm(total=100, desc="query", bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}{postfix}", leave=False)


def run_with_progress(
    work: Callable[[], Any],
    con: Any,
    *,
    rows_scored: Callable[[], int],
    after_s: float,
    show: bool = True,
) -> Any:
    """Run ``work()`` on a thread; show progress after ``after_s``; Ctrl-C interrupts ``con``."""
    outcome: dict[str, Any] = {}
    handoff = Handoff()
    # An Event, not Thread.join: a KeyboardInterrupt landing inside join() can leave
    # the thread marked as stopped while it still runs (CPython 3.11).
    done = threading.Event()

    def target() -> None:
        handoff.attach()
        try:
            outcome["value"] = work()
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread, which re-raises it
            outcome["error"] = err
        finally:
            done.set()

    started, rows_at_start = time.monotonic(), rows_scored()
    threading.Thread(target=target, name="rayudf-query", daemon=True).start()
    bar = None

    def draw(percent: float) -> None:
        elapsed = time.monotonic() - started
        rows = rows_scored() - rows_at_start
        if percent >= 0:
            bar.n = min(100.0, percent)
        bar.set_postfix_str(f"{rows:,} rows scored, {rows / max(elapsed, 1e-9):,.0f} rows/s", refresh=False)
        bar.refresh()

    try:
        while not done.wait(_TICK_S):
            handoff.serve()
            percent = con.query_progress()
            # no bar while nothing measurable runs (a registration loading its model)
            if bar is None and show and time.monotonic() - started >= after_s and (percent >= 0 or rows_scored() > rows_at_start):
                bar = _bar()
            if bar is not None:
                draw(percent)
        if bar is not None and "error" not in outcome:
            draw(100.0)  # finished: a full bar (a notebook widget left short turns red)
    except KeyboardInterrupt:
        # DuckDB drops an interrupt that lands before its query starts (a statement still being planned, a
        # model still loading): interrupt again each tick until the work ends. A call handed over meanwhile
        # still runs, or the query thread would wait forever.
        while not done.is_set():
            con.interrupt()
            handoff.serve()
            done.wait(_TICK_S)
        raise QueryInterrupted("query interrupted; the session and its workers are ready for the next one") from None
    finally:
        handoff.close()  # should this thread leave early (a second Ctrl-C), the query must not wait for it
        if bar is not None:
            bar.close()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")
