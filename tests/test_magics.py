"""The %sql / %%sql magics, driven through a real IPython shell's run_cell."""

from __future__ import annotations

import os
import signal
import threading
import time

import cloudpickle
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from IPython.core.error import UsageError

from conftest import WORKER_CPUS, named_actors


@pytest.fixture(scope="module")
def ip(ray_cluster):
    from IPython.testing.globalipapp import start_ipython

    shell = start_ipython()
    shell.run_line_magic("load_ext", "sql_magics")
    yield shell
    shell.run_cell("%sql --close")


def interrupt_when(ready, fired: list[float]) -> threading.Thread:
    """Ctrl-C to the main thread once ``ready()`` says the cell is where the test wants it (within 60 s),
    its time put in ``fired``: a fixed delay raced the cell's start on a loaded machine."""
    main = threading.main_thread().ident

    def fire() -> None:
        deadline = time.monotonic() + 60
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        fired.append(time.monotonic())
        signal.pthread_kill(main, signal.SIGINT)

    thread = threading.Thread(target=fire, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def ctrl_c():
    """Ctrl-C raises KeyboardInterrupt in the main thread while the test runs, as in a kernel running a cell
    (ipykernel puts this handler on around each cell). pytest started by a non-interactive shell in the
    background (``make test &``) inherits SIGINT ignored, and Python then leaves it so."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def fired_when(fired: list[float], started: float) -> str:
    """What a failed interrupt test says: when the Ctrl-C went, after the cell started (never: ready() had not returned)."""
    if not fired:
        return "the Ctrl-C never went: ready() had not returned when the cell ended"
    return (f"the Ctrl-C went {fired[0] - started:.1f} s after the cell started, and the cell ran on "
            f"(SIGINT's handler now: {signal.getsignal(signal.SIGINT)!r})")


@pytest.fixture
def magic(ip):
    magic = ip.magics_manager.registry["SqlMagic"]
    yield magic
    magic.displaylimit, magic.short_errors, magic.progress_after_s = 20, True, 1.0


def run(ip, cell):
    result = ip.run_cell(cell)
    return result.result, result.error_in_exec


@pytest.fixture(scope="module")
def slow_model(model_dir):
    class Slow:
        n_features_in_ = 2

        def predict(self, batch):
            time.sleep(0.02)
            return np.asarray(batch, dtype=np.float64).sum(axis=1)

    path = model_dir / "slow_magic.pkl"
    path.write_bytes(cloudpickle.dumps(Slow()))
    return path


def test_line_and_cell_forms(ip):
    result, error = run(ip, "%sql select 41 + 1 as answer from range(1)")
    assert error is None and result.df["answer"].tolist() == [42]

    result, error = run(ip, "%%sql\nselect range as i from range(5) as nums;\nselect sum(i) as total from nums as output;")
    assert error is None and result.df["total"].tolist() == [10]


def test_store_with_double_less_than(ip):
    _, error = run(ip, "%%sql stored <<\nselect range as i from range(3) as output;")
    assert error is None and isinstance(ip.user_ns["stored"], pd.DataFrame) and ip.user_ns["stored"]["i"].tolist() == [0, 1, 2]
    result, error = run(ip, "%sql line_stored << select 7 as seven from range(1)")
    assert error is None and result is None and ip.user_ns["line_stored"]["seven"].tolist() == [7]


def test_dollar_name_is_bound_as_a_parameter(ip):
    ip.user_ns["who"] = "O'Neil; drop table x --"
    ip.user_ns["people"] = pd.DataFrame({"name": ["ann", "O'Neil; drop table x --"], "age": [3, 4]})
    result, error = run(ip, "%sql select age from people where name = $who")
    assert error is None and result.df["age"].tolist() == [4]
    result, error = run(ip, "%%sql\nset n = '2';\nselect $who as w, ${n} as n from range(1) as output;")
    assert error is None and result.df.to_dict("records") == [{"w": ip.user_ns["who"], "n": 2}]


def test_notebook_dataframes_and_arrow_tables_by_name(ip):
    ip.user_ns["frame_df"] = pd.DataFrame({"x": [1, 2, 3]})
    ip.user_ns["arrow_tbl"] = pa.table({"y": [10, 20]})
    result, error = run(ip, "%sql select (select sum(x) from frame_df) + (select sum(y) from arrow_tbl) as s from range(1)")
    assert error is None and result.df["s"].tolist() == [36]
    ip.user_ns["frame_df"] = pd.DataFrame({"x": [100]})  # rebinding the name is seen by the next query
    result, _ = run(ip, "%sql select sum(x) as s from frame_df")
    assert result.df["s"].tolist() == [100]


def test_dataframe_of_numpy_scalar_lists_keeps_its_types(ip, model_dir):
    """Embeddings kept as lists of np.float32 reach SQL as FLOAT lists, not as their repr."""
    weights = np.arange(1.0, 9.0)

    class Weighted:
        n_features_in_ = 8

        def predict(self, batch):
            return np.asarray(batch, dtype=np.float64) @ weights

    path = model_dir / "weighted.pkl"
    path.write_bytes(cloudpickle.dumps(Weighted()))
    rng = np.random.default_rng(3)
    embeddings = [list(rng.random(8).astype("float32")) for _ in range(5)]
    ip.user_ns["people"] = pd.DataFrame({"name": list("abcde"), "emb": embeddings})
    _, error = run(ip, f'%sql register model.`{path}` as weigh where workers="1" and num_cpus="{WORKER_CPUS}"')
    assert error is None
    result, error = run(ip, "%sql select name, weigh(emb::FLOAT[8]) as w from people order by name")
    assert error is None, error
    expected = np.stack(embeddings).astype(np.float64) @ weights
    np.testing.assert_allclose(result.df["w"].to_numpy(), expected, rtol=1e-6)


def test_a_named_select_says_what_it_made(ip, capsys):
    ip.user_ns["pets"] = pd.DataFrame({"name": ["rex"], "age": [3], "kind": ["dog"]})
    result, error = run(ip, "%%sql\nselect * from pets as p")
    assert error is None and result is None
    assert capsys.readouterr().out.strip() == "view p created: 3 columns; end with 'as output' to see rows"
    result, error = run(ip, "%sql select 42 as answer")
    assert error is None and result is None
    assert capsys.readouterr().out.strip() == "view answer created: 1 column; end with 'as output' to see rows"
    result, error = run(ip, "%%sql\nselect * from pets as p2;\nselect name from p2 as output")
    assert result.df["name"].tolist() == ["rex"] and "created" not in capsys.readouterr().out  # rows shown: nothing to say


def test_display_limit_and_footer(ip, magic):
    ip.run_line_magic("config", "SqlMagic.displaylimit = 3")
    result, error = run(ip, "%sql select range as i from range(50)")
    html = result._repr_html_()
    assert error is None and len(result.df) == 50
    assert html.count("<tr") == 4  # header + 3 rows
    assert "50 rows × 1 column ·" in html and "(first 3 shown)" in html


def test_short_errors_for_a_malformed_statement_and_a_missing_table(ip, magic):
    _, error = run(ip, "%%sql\nselect 1 from range(1);\nload csv.`x` ass t;")
    assert isinstance(error, UsageError)
    lines = str(error).splitlines()
    assert lines[0] == "line 2, col 14: load: expected 'as <table>' after the path, found 'ass'"
    assert lines[2].index("^") == lines[1].index("ass")

    _, error = run(ip, "%sql select * from no_such_table")
    assert isinstance(error, UsageError) and "line 1:" in str(error) and "no_such_table" in str(error)
    assert len(str(error).splitlines()) == 1

    ip.run_line_magic("config", "SqlMagic.short_errors = False")
    _, error = run(ip, "%sql select * from no_such_table")
    assert type(error).__name__ == "ExecutionError"


def test_workers_table_and_progress_bar_for_a_long_query(ip, magic, slow_model, capsys):
    _, error = run(ip, f'%sql register model.`{slow_model}` as slow where workers="1" and num_cpus="{WORKER_CPUS}" and batch_size="256"')
    assert error is None
    capsys.readouterr()
    ip.run_line_magic("config", "SqlMagic.progress_after_s = 0.3")
    result, error = run(ip, "%sql select sum(slow(range::DOUBLE, 1.0)) as s from range(30000)")
    assert error is None and result.df["s"][0] == pytest.approx(sum(range(30000)) + 30000.0)
    assert "rows scored" in capsys.readouterr().err

    result, _ = run(ip, "%sql select 1 as fast from range(1)")
    assert "rows scored" not in capsys.readouterr().err

    workers, error = run(ip, "%sql !workers")
    assert error is None
    row = workers.df.set_index("function").loc["slow"]
    assert row["rows"] == 30000 and row["alive"]


def test_interrupt_cancels_the_query_and_the_next_one_works(ip, magic, slow_model, ctrl_c):
    run(ip, f'%sql register model.`{slow_model}` as slow2 where workers="1" and num_cpus="{WORKER_CPUS}" and batch_size="128"')
    udf = magic.session.functions["slow2"].udf
    scored_before = sum(s["rows"] for s in udf.stats())
    fired: list[float] = []
    timer = interrupt_when(lambda: sum(s["rows"] for s in udf.stats()) > scored_before, fired)  # the query runs
    started = time.monotonic()
    _, error = run(ip, "%sql select sum(slow2(range::DOUBLE, 1.0)) from range(1000000)")
    timer.join()
    assert isinstance(error, UsageError) and "interrupted" in str(error), fired_when(fired, started)
    assert time.monotonic() - fired[0] < 30  # the full query would take over a minute
    result, error = run(ip, "%sql select slow2(2.0, 3.0) as y from range(1)")
    assert error is None and result.df["y"].tolist() == [5.0]


def test_an_interrupt_before_duckdb_runs_the_query_still_stops_it(ip, magic, slow_model, ctrl_c):
    # Ctrl-C while the cell's first statement starts a model's worker: DuckDB drops an interrupt of an
    # idle connection, so the magic interrupts again until the cell's work ends, the select included
    fired: list[float] = []
    timer = interrupt_when(lambda: any(".slow3." in name for name in named_actors("rayudf.", timeout_s=0)), fired)
    cell = (f'%%sql\nregister model.`{slow_model}` as slow3 where workers="1" and num_cpus="{WORKER_CPUS}" and batch_size="128";\n'
            "select sum(slow3(range::DOUBLE, 1.0)) from range(1000000)")
    started = time.monotonic()
    _, error = run(ip, cell)
    timer.join()
    assert isinstance(error, UsageError) and "interrupted" in str(error), fired_when(fired, started)
    function = magic.session.functions.get("slow3")
    if function is not None:  # the register was done when the interrupt landed: the select stopped early
        assert sum(s["rows"] for s in function.udf.stats()) < 1_000_000
        return
    # The interrupt landed inside the register (a slow machine): it is undone, its workers with it.
    deadline = time.monotonic() + 20
    while (left := [n for n in named_actors("rayudf.", timeout_s=0) if ".slow3." in n]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"an interrupted register left workers running: {left}"


def test_close_stops_the_workers(ip, sklearn_model):
    _, path = sklearn_model
    magic = ip.magics_manager.registry["SqlMagic"]
    run(ip, f'%sql register model.`{path}` as closing where workers="1" and num_cpus="{WORKER_CPUS}"')
    prefix = magic.session.registry.actor_prefix("closing")
    assert named_actors(prefix, timeout_s=0)
    _, error = run(ip, "%sql --close")
    assert error is None and named_actors(prefix) == []
    result, error = run(ip, "%sql select 1 as again from range(1)")  # a new session starts on demand
    assert error is None and result.df["again"].tolist() == [1]


def test_nothing_to_run_and_stray_line_text(ip):
    _, error = run(ip, "%sql   ")
    assert isinstance(error, UsageError) and "nothing to run" in str(error)
    _, error = run(ip, "%%sql oops\nselect 1")
    assert isinstance(error, UsageError) and "name <<" in str(error)


FRESH_KERNEL = """
import os
os.environ.pop("RAY_ADDRESS", None)
from IPython.testing.globalipapp import start_ipython
ip = start_ipython()
ip.run_line_magic("load_ext", "sql_magics")
cells = [
    '%%sql\\nregister model.`{path}` as lr where workers="1" and num_cpus="0.5";',
    "import time; time.sleep(2)",  # the cell that registered is over; its thread is gone
    "%sql lr_out << select lr(range(64)::FLOAT[64]) as label from range(3)",
]
for cell in cells:
    result = ip.run_cell(cell)
    assert result.error_in_exec is None, result.error_in_exec
print("LABELS", ip.user_ns["lr_out"]["label"].tolist())
ip.run_cell("%sql --close")
"""


def test_a_kernel_without_ray_starts_its_own_and_keeps_it(sklearn_model, tmp_path):
    import subprocess
    import sys

    model, path = sklearn_model
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_KERNEL.format(path=path))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = model.predict(np.arange(64, dtype=np.float32)[None, :])[0]
    assert f"LABELS [{expected}, {expected}, {expected}]" in done.stdout
    assert "SIGTERM handler is not set" not in done.stderr
