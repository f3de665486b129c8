"""``python -m bench``: time SQL scoring against its peers in one run and write bench/RESULTS.md.

Runs are interleaved (A B A B ...) so a noisy neighbour hurts every contender alike;
the report quotes medians and ratios from this one run.

Example:
    $ python -m bench --rows 20000 --runs 3 --skip-memory      # a quick look
    $ make bench                                                # the full run (about 5 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import duckdb

from bench import contenders as c
from bench.data import build_model, export_onnx, start_ray, write_table


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000, help="rows of the scored table")
    p.add_argument("--width", type=int, default=784, help="FLOAT[width] per row")
    p.add_argument("--runs", type=int, default=5, help="interleaved runs of each contender")
    p.add_argument(
        "--batch-size", type=int, default=2048, help="rows per model call, for every contender (DuckDB passes at most 2048 per call)"
    )
    p.add_argument("--per-row-rows", type=int, default=2000, help="rows the per-row UDF scores (then scaled)")
    p.add_argument("--big-rows", type=int, default=640_000, help="rows of the ~2 GB table for the memory run")
    p.add_argument("--workdir", type=Path, default=Path("bench_data"), help="where tables and models go")
    p.add_argument("--out", type=Path, default=Path("bench/RESULTS.md"), help="the report")
    p.add_argument("--skip-memory", action="store_true", help="skip the ~2 GB memory run")
    p.add_argument("--shape-runs", type=int, default=3, help="interleaved runs of each query shape and row-group size")
    return p.parse_args(argv)


class Timings:
    """Seconds per contender, in the order they ran, and the driver's CPU seconds of each run."""

    def __init__(self) -> None:
        self.runs: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}

    def add(self, name: str, seconds: float, cpu: float | None = None) -> None:
        self.runs.setdefault(name, []).append(seconds)
        if cpu is not None:
            self.cpu.setdefault(name, []).append(cpu)
        print(f"  {name}: {seconds:.3f} s" + (f" (driver CPU {cpu:.2f} s)" if cpu is not None else ""), flush=True)

    def median(self, name: str) -> float:
        return statistics.median(self.runs[name])

    def cpu_per_million(self, name: str, rows: int) -> float:
        """The driver's median CPU seconds per million rows."""
        return statistics.median(self.cpu[name]) * 1e6 / rows


def _interleave(t: Timings, runs: int, contenders: dict) -> None:
    for i in range(runs):
        print(f"run {i + 1}/{runs}", flush=True)
        for name, work in contenders.items():
            t.add(name, *c.timed(work))


def _ipython_shell():
    from IPython.testing.globalipapp import start_ipython

    shell = start_ipython()
    shell.run_line_magic("load_ext", "sql_magics")
    return shell


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    import keras
    import ray

    from sql_magics import Session

    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    work = args.workdir
    table = write_table(work / f"table_{args.rows}x{args.width}.parquet", rows=args.rows, width=args.width)
    model_path = build_model(work / f"mlp_{args.width}.keras", width=args.width)
    print(f"table {table} ({table.stat().st_size / 2**20:,.0f} MiB), model {model_path}", flush=True)

    start_ray()
    model = keras.models.load_model(model_path, compile=False)
    t = Timings()
    results: dict[str, float] = {}
    bs = args.batch_size

    in_process = duckdb.connect()  # the limit: the same model called inside DuckDB
    c.register_in_process(in_process, "f_local", model, bs)
    session = Session(warm="none")  # its spares come from its own registrations (row i); bench.interactive warms ahead
    q_local, q1, q2 = (c.scoring_query(f, table) for f in ("f_local", "f1", "f2"))
    session.register_model("f1", model_path, workers=1, batch_size=bs)
    session.register_model("f2", model_path, workers=2, batch_size=bs)
    onnx_path = export_onnx(model_path, work / f"mlp_{args.width}.onnx")  # the same weights
    c.register_in_process(in_process, "g_local", c.OnnxModel(onnx_path), bs)
    session.register_model("g2", onnx_path, workers=2, batch_size=bs)
    q_onnx_local, q_onnx = c.scoring_query("g_local", table), c.scoring_query("g2", table)
    results["spare_mb"] = _idle_spare_mb(session)
    for query, con in ((q_local, in_process), (q1, session.con), (q2, session.con), (q_onnx_local, in_process), (q_onnx, session.con)):
        c.fetch(con, query)  # warm: TF graphs traced, files cached

    print("(a)/(b) warm scoring, results to the driver, on both paths; the same MLP as Keras and as ONNX", flush=True)
    _interleave(t, args.runs, {
        "a_limit": lambda: c.fetch(in_process, q_local),
        "b_rayudf_1w": lambda: c.fetch_planned(session, q1),
        "b_rayudf_2w": lambda: c.fetch_planned(session, q2),
        "b_driver_1w": lambda: c.fetch(session.con, q1),
        "b_driver_2w": lambda: c.fetch(session.con, q2),
        "a_limit_onnx": lambda: c.fetch(in_process, q_onnx_local),
        "b_rayudf_onnx_2w": lambda: c.fetch_planned(session, q_onnx),
    })
    session.unregister("g2")
    session.unregister("f1")  # frees its CPU for the notebook session's workers
    _shapes(args, t, in_process, session, work)

    print("(f) interactive: limit 100, and a trivial select", flush=True)
    shell = _ipython_shell()
    q_small_local, q_small = c.scoring_query("f_local", table, 100), c.scoring_query("f2", table, 100)
    shell.run_cell("%sql select 1 from range(1)")
    shell_session = shell.magics_manager.registry["SqlMagic"].session
    shell_session.register_model("f2", model_path, workers=2, batch_size=bs)
    _interleave(t, max(args.runs, 20), {
        "f_raw_duckdb_limit100": lambda: in_process.sql(q_small_local).df(),
        "f_session_limit100": lambda: session.sql(q_small),
        "f_magic_limit100": lambda: shell.run_cell(f"%sql {q_small}", silent=True),
        "f_raw_duckdb_trivial": lambda: in_process.sql("select 42 as x").df(),
        "f_session_trivial": lambda: session.sql("select 42 as x from range(1)"),
        "f_magic_trivial": lambda: shell.run_cell("%sql select 42 as x from range(1)", silent=True),
    })
    shell.run_cell("%sql --close")
    session.unregister("f2")

    print("(d) per-row Python UDF on a subset", flush=True)
    c.register_per_row(in_process, "f_row", model)
    subset = f"SELECT f_row(image) FROM read_parquet('{table}') LIMIT {args.per_row_rows}"
    _interleave(t, min(args.runs, 3), {"d_per_row": lambda: c.fetch(in_process, subset)})
    results["d_rows_per_s"] = args.per_row_rows / t.median("d_per_row")

    print("(b)+(e) cold, end to end, against (c) Ray Data end to end", flush=True)

    def cold() -> None:
        started = time.perf_counter()
        session.register_model("fc", model_path, workers=2, batch_size=bs)
        c.fetch(session.con, c.scoring_query("fc", table, 1))
        t.add("e_register_to_first_row", time.perf_counter() - started)
        c.fetch_planned(session, c.scoring_query("fc", table))
        session.unregister("fc")

    def first_in_a_session() -> None:
        started = time.perf_counter()
        with Session(warm="none") as fresh:
            fresh.register_model("ff", model_path, workers=2, batch_size=bs)
            c.fetch(fresh.con, c.scoring_query("ff", table, 1))
            t.add("e_first_register_to_first_row", time.perf_counter() - started)

    c.ray_data_run(table, model_path, 2, bs)  # warm Ray Data's own imports once
    _interleave(t, args.runs, {
        "e_first_model": first_in_a_session,
        "be_rayudf_cold_2w": cold,
        "c_ray_data_2w": lambda: c.ray_data_run(table, model_path, 2, bs),
    })

    session.close()
    memory = [] if args.skip_memory else [_memory_run(args, model_path, bs, work, memory_limit) for memory_limit in (None, "400MB")]
    ray.shutdown()
    _report(args, command, t, results, memory, table)
    return 0


def _idle_spare_mb(session, timeout_s: float = 120.0) -> tuple[float, float]:
    """(RSS, private) MiB of an idle warm spare of the session's pool (TensorFlow imported, no model)."""
    import psutil
    import ray

    from udf_engine.actors.warm_pool import find_pool

    pool = find_pool(session.registry.pool_name)
    deadline = time.monotonic() + timeout_s
    while not (spares := ray.get(pool.spares.remote())) and time.monotonic() < deadline:
        time.sleep(0.5)
    info = psutil.Process(ray.get(spares[0].stats.remote())["pid"]).memory_info()  # stats answers once imports are done
    return info.rss / 2**20, (info.rss - info.shared) / 2**20


ROW_GROUPS = (1_000, 10_000, 100_000)
SHAPES = ("fetch", "aggregate", "copy")


def _shapes(args, t: Timings, in_process, session, work: Path) -> None:
    """(h) Each query shape over tables of 1k, 10k and 100k-row groups: the limit, and rayudf with 2 workers on both paths."""
    out = work / "out.parquet"
    for group in ROW_GROUPS:
        path = write_table(work / f"table_{args.rows}x{args.width}_rg{group}.parquet", rows=args.rows, width=args.width, row_group=group)
        local, scored = c.scoring_query("f_local", path), c.scoring_query("f2", path)
        local_sum, scored_sum = c.aggregate_query("f_local", path), c.aggregate_query("f2", path)
        print(f"(h) shapes over {group:,}-row groups", flush=True)
        c.fetch(in_process, local)  # the file in the page cache
        _interleave(t, args.shape_runs, {
            f"h_limit_fetch_{group}": partial(c.fetch, in_process, local),
            f"h_workers_fetch_{group}": partial(c.fetch_planned, session, scored),
            f"h_driver_fetch_{group}": partial(c.fetch, session.con, scored),
            f"h_limit_aggregate_{group}": partial(c.fetch, in_process, local_sum),
            f"h_workers_aggregate_{group}": partial(c.fetch_planned, session, scored_sum),
            f"h_driver_aggregate_{group}": partial(c.fetch, session.con, scored_sum),
            f"h_limit_copy_{group}": partial(c.copy_to, in_process, local, out),
            f"h_workers_copy_{group}": partial(c.copy_planned, session, scored, out),
            f"h_driver_copy_{group}": partial(c.copy_to, session.con, scored, out),
        })


def _memory_run(args, model_path, bs, work, memory_limit: str | None) -> dict:
    """(g) in a fresh driver process that joins this Ray, so its RSS is a rayudf user's driver's.

    Run twice: with DuckDB's default memory_limit (80% of RAM), whose buffer pool keeps what
    it read, and with ``memory_limit`` set, as a user who wants a small driver would.
    """
    import ray

    big = write_table(work / f"big_{args.big_rows}x{args.width}.parquet", rows=args.big_rows, width=args.width, seed=1)
    print(f"(g) scoring and saving {big} ({big.stat().st_size / 2**30:.2f} GiB)", flush=True)
    done = subprocess.run(
        [sys.executable, "-m", "bench.memory_run", str(big), str(model_path), str(work / "big_out.parquet"),
         "--ray-address", ray.get_runtime_context().gcs_address, "--batch-size", str(bs)]
        + (["--memory-limit", memory_limit] if memory_limit else []),
        capture_output=True, text=True, check=True,
    )
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    return {"bytes": big.stat().st_size, "rows": args.big_rows, "memory_limit": memory_limit, **measured}


def _machine() -> str:
    import psutil
    import ray

    return (
        f"{platform.platform()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
        f"Python {platform.python_version()}, duckdb {duckdb.__version__}, ray {ray.__version__}"
    )


def _report(args, command, t: Timings, results, memory, table) -> None:
    m = t.median
    rows = args.rows
    a, b2 = m("a_limit"), m("b_rayudf_2w")
    cold_total = m("be_rayudf_cold_2w")  # register, first row, the whole query, unregister
    cpu = t.cpu_per_million
    lines = [
        "# Benchmark results",
        "",
        f"Command: `{command}`  ",
        f"Machine: {_machine()}  ",
        f"Table: {rows:,} rows x FLOAT[{args.width}] ({table.stat().st_size / 2**20:,.0f} MiB); model: Keras MLP "
        f"{args.width}->512->10; batch size {args.batch_size}; medians of {args.runs} interleaved runs "
        f"({args.shape_runs} for the shapes). Worker path: the workers read their shares of the Parquet row groups "
        "and score them, only scores come back; driver path: DuckDB reads the rows in the driver and sends them to "
        "the workers (`set worker_scan = \"off\"`, and any query that does not qualify). Driver CPU: CPU seconds "
        "of the process running DuckDB, per million rows.",
        "",
        "| measure | median | rows/s | ratio | driver CPU-s / M rows | target |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| (a) in-process limit (DuckDB Arrow UDF) | {a:.2f} s | {rows / a:,.0f} | 1.00 | {cpu('a_limit', rows):.1f} | |",
    ]
    for label, name in (("worker path, 1 worker", "b_rayudf_1w"), ("worker path, 2 workers", "b_rayudf_2w"),
                        ("driver path, 1 worker", "b_driver_1w"), ("driver path, 2 workers", "b_driver_2w")):
        target = "<= 2 CPU-s" if name == "b_rayudf_2w" else ""
        lines.append(
            f"| (b) rayudf, {label} | {m(name):.2f} s | {rows / m(name):,.0f} | {a / m(name):.2f}x of (a) | "
            f"{cpu(name, rows):.1f} | {target} |"
        )
    lines += [
        f"| (a) in-process limit, the same MLP as ONNX (ONNX Runtime) | {m('a_limit_onnx'):.2f} s | {rows / m('a_limit_onnx'):,.0f} | "
        f"{a / m('a_limit_onnx'):.2f}x the rows/s of (a) Keras | | |",
        f"| (b) rayudf register onnx, 2 workers, worker path | {m('b_rayudf_onnx_2w'):.2f} s | {rows / m('b_rayudf_onnx_2w'):,.0f} | "
        f"{m('a_limit_onnx') / m('b_rayudf_onnx_2w'):.2f}x of its limit | {cpu('b_rayudf_onnx_2w', rows):.1f} | |",
    ]
    for group in ROW_GROUPS:
        for shape in SHAPES:
            limit = m(f"h_limit_{shape}_{group}")
            for path in ("workers", "driver"):
                name = f"h_{path}_{shape}_{group}"
                lines.append(
                    f"| (h) {shape}, {group:,}-row groups, 2 workers, {path} path | {m(name):.2f} s | {rows / m(name):,.0f} | "
                    f"{limit / m(name):.2f}x of its limit ({limit:.2f} s) | {cpu(name, rows):.1f} | "
                    f"{'>= 0.95x' if path == 'workers' else ''} |"
                )
    lines += [
        f"| (e) register to first row, first model of a session, 2 workers | {m('e_first_register_to_first_row'):.2f} s | | | | |",
        f"| (i) an idle warm spare (TensorFlow imported, no model): memory | {results['spare_mb'][0]:,.0f} MiB RSS "
        f"({results['spare_mb'][1]:,.0f} private) | | | | |",
        f"| (e) register to first row, a model in a session that served others, 2 workers | {m('e_register_to_first_row'):.2f} s | "
        "| | | <= 2 s |",
        f"| (b)+(e) rayudf cold, end to end | {cold_total:.2f} s | {rows / cold_total:,.0f} | "
        f"{cold_total / m('c_ray_data_2w'):.2f}x the time of (c) | | <= 0.5x |",
        f"| (c) Ray Data map_batches, 2 actors, end to end | {m('c_ray_data_2w'):.2f} s | {rows / m('c_ray_data_2w'):,.0f} | 1.00 | | |",
        f"| (d) per-row Python UDF ({args.per_row_rows:,} rows, scaled) | {rows / results['d_rows_per_s']:.1f} s | "
        f"{results['d_rows_per_s']:,.0f} | {(rows / b2) / results['d_rows_per_s']:.0f}x slower than (b) | | |",
        f"| (f) limit 100: raw DuckDB + in-process UDF | {1000 * m('f_raw_duckdb_limit100'):.1f} ms | | | | |",
        f"| (f) limit 100: Session.sql | {1000 * m('f_session_limit100'):.1f} ms | | "
        f"{1000 * (m('f_session_limit100') - m('f_raw_duckdb_limit100')):+.1f} ms | | <= +20 ms |",
        f"| (f) limit 100: %sql | {1000 * m('f_magic_limit100'):.1f} ms | | "
        f"{1000 * (m('f_magic_limit100') - m('f_raw_duckdb_limit100')):+.1f} ms | | <= +20 ms |",
        f"| (f) trivial select: raw DuckDB / Session.sql / %sql | {1000 * m('f_raw_duckdb_trivial'):.1f} / "
        f"{1000 * m('f_session_trivial'):.1f} / {1000 * m('f_magic_trivial'):.1f} ms | | "
        f"{1000 * (m('f_magic_trivial') - m('f_raw_duckdb_trivial')):+.1f} ms (%sql) | | a few ms |",
    ]
    for run in memory:
        peaks = ", ".join(f"{k} {v:,.0f} MiB ({run['peak_private_mb'][k]:,.0f} private)" for k, v in run["peak_mb"].items())
        setting = f"DuckDB memory_limit {run['memory_limit']}" if run["memory_limit"] else "DuckDB's default memory_limit"
        lines.append(
            f"| (g) score + save {run['bytes'] / 2**30:.2f} GiB ({run['rows']:,} rows), 2 workers, {setting} | "
            f"{run['seconds']:.1f} s | {run['rows'] / run['seconds']:,.0f} | peak RSS: {peaks} | | driver < 1 GB |"
        )
    lines += ["", "All runs (seconds, in order):", ""]
    lines += [f"- {name}: " + ", ".join(f"{s:.3f}" for s in runs) for name, runs in t.runs.items()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:60]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
