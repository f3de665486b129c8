"""``python -m bench.interactive``: how long a notebook user waits, with spares warmed ahead of need and without.

Each round runs a notebook-shaped session in a fresh process (no Ray up yet), once with
``Session()`` (warming Keras spares ahead, the default) and once with ``Session(warm="none")``,
interleaved:

1. the session is made and a first cell runs; the user pauses; a Keras MLP 784-512-10 is
   registered: seconds from ``register`` to the first row;
2. a second model is registered right after (no pause): the same;
3. five aggregates over a 60k-row Parquet table (``sum(list_max(f(image)))``, 10k-row groups)
   run at once, while the pool refills its spares;
4. after a pause, a third model: register to first row; after another pause, the same five
   aggregates again, settled;
5. the same aggregate with the model in-process (the limit).

The aggregates run as a notebook's ``%%sql`` runs them: planned, so on the worker path. Then, in
one session, the fixed cost of a worker-path query at 10k, 60k and 200k rows: its wall time less
the busiest worker's time reading and scoring its shares (``busy_s`` of ``!workers``), next to the
same aggregate in-process.

Example:
    $ python -m bench.interactive --rounds 1 --pause 5          # a quick look
    $ make bench                                               # with the rest of the benchmark
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
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench import contenders as c
from bench.data import build_model, write_table

QUERIES = 5  # aggregates run right after a registration, and settled
FIXED_ROWS = (10_000, 60_000, 200_000)  # table sizes the fixed cost per worker-path query is measured at


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.interactive", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of each contender")
    p.add_argument("--pause", type=float, default=12.0, help="seconds the user pauses before the first registration")
    p.add_argument("--settle", type=float, default=25.0, help="seconds of the later pauses (spares get ready)")
    p.add_argument("--rows", type=int, default=60_000, help="rows of the aggregated table")
    p.add_argument("--workdir", type=Path, default=Path("bench_data"), help="where tables and models go")
    p.add_argument("--out", type=Path, default=Path("bench/INTERACTIVE.md"), help="the report")
    p.add_argument("--one", choices=("keras", "none"), help=argparse.SUPPRESS)  # a round in this process
    return p.parse_args(argv)


def _first_row(session, name: str, model: Path, table: Path) -> float:
    started = time.perf_counter()
    session.register_model(name, model)
    c.fetch(session.con, c.scoring_query(name, table, 1))
    return time.perf_counter() - started


def _aggregates(session, name: str, table: Path) -> list[float]:
    return [c.timed(lambda: c.fetch_planned(session, c.aggregate_query(name, table)))[0] for _ in range(QUERIES)]


def _round(args, warm: str, model: Path, table: Path) -> dict:
    """One notebook-shaped session, in this process (which has not started Ray)."""
    from sql_magics import Session

    with Session(warm=warm) as session:
        session.sql("select 42 as answer from range(1)")  # the first cell
        time.sleep(args.pause)
        result = {"first_s": _first_row(session, "f1", model, table)}
        result["second_s"] = _first_row(session, "f2", model, table)
        result["warming_s"] = _aggregates(session, "f2", table)
        time.sleep(args.settle)
        result["paused_s"] = _first_row(session, "f3", model, table)
        time.sleep(args.settle)
        result["settled_s"] = _aggregates(session, "f2", table)
    return result


def _in_process(model_path: Path, table: Path) -> list[float]:
    import duckdb
    import keras

    con = duckdb.connect()
    c.register_in_process(con, "f_local", keras.models.load_model(model_path, compile=False), 2048)
    query = c.aggregate_query("f_local", table)
    c.fetch(con, query)  # traced once, file cached
    return [c.timed(lambda: c.fetch(con, query))[0] for _ in range(QUERIES)]


def _fixed_costs(model_path: Path, tables: dict[int, Path]) -> dict[int, dict]:
    """Per table size: worker-path walls, their fixed costs (wall less the busiest worker's busy
    seconds in that query), and the same aggregate in-process."""
    from sql_magics import Session

    costs: dict[int, dict] = {}
    with Session(warm="none") as session:
        session.register_model("f", model_path)
        udf = session.functions["f"].udf
        for rows, table in tables.items():
            query = c.aggregate_query("f", table)
            c.fetch_planned(session, query)  # the file cached, the shape traced
            walls, fixed = [], []
            for _ in range(QUERIES):
                before = {w["worker"]: w["busy_s"] for w in udf.stats()}
                wall = c.timed(lambda: c.fetch_planned(session, query))[0]  # noqa: B023 - called at once
                busiest = max(w["busy_s"] - before.get(w["worker"], 0.0) for w in udf.stats())
                walls.append(wall)
                fixed.append(wall - busiest)
            shares = session.db.planner.explain(session.con, query)["shares"]
            costs[rows] = {"wall_s": walls, "fixed_s": fixed, "shares_per_worker": int(shares) / udf.conf.workers}
    for rows, table in tables.items():
        costs[rows]["local_s"] = _in_process(model_path, table)
    return costs


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    work = args.workdir
    table = write_table(work / f"interactive_{args.rows}x784.parquet", rows=args.rows, width=784, row_group=10_000)
    model = build_model(work / "mlp_784.keras", width=784)
    if args.one:
        print(json.dumps(_round(args, args.one, model, table)))
        return 0
    results: dict[str, list[dict]] = {"keras": [], "none": []}
    for r in range(args.rounds):
        for warm in results:
            print(f"round {r + 1}: warm={warm}", flush=True)
            command = [sys.executable, "-m", "bench.interactive", "--one", warm, *_passed(args)]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            results[warm].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print("  " + json.dumps(results[warm][-1]), flush=True)
    limit = _in_process(model, table)
    sized = {rows: write_table(work / f"interactive_{rows}x784.parquet", rows=rows, width=784, row_group=10_000) for rows in FIXED_ROWS}
    fixed = _fixed_costs(model, sized)
    _report(args, " ".join(["python -m bench.interactive", *(argv if argv is not None else sys.argv[1:])]), results, limit, fixed)
    return 0


def _passed(args) -> list[str]:
    return ["--pause", str(args.pause), "--settle", str(args.settle), "--rows", str(args.rows), "--workdir", str(args.workdir)]


def _report(args, command: str, results: dict, limit: list[float], fixed: dict[int, dict]) -> None:
    def med(warm: str, key: str) -> float:
        values = [v for run in results[warm] for v in (run[key] if isinstance(run[key], list) else [run[key]])]
        return statistics.median(values)

    local = statistics.median(limit)
    lines = [
        "# Interactive speed",
        "",
        f"`{command}` on {platform.node()} ({os.cpu_count()} cores), {args.rounds} interleaved rounds, medians.",
        f"A Keras MLP 784-512-10, 2 workers (the default); the user pauses {args.pause:.0f} s before the first",
        f"registration and {args.settle:.0f} s before the third; aggregates over {args.rows:,} rows in 10k-row groups.",
        "",
        "| row | warm ahead (default) | warm=\"none\" | target |",
        "| --- | --- | --- | --- |",
        f"| first registration, register to first row | {med('keras', 'first_s'):.2f} s | {med('none', 'first_s'):.2f} s | <= 2.5 s |",
        f"| second registration, no pause | {med('keras', 'second_s'):.2f} s | {med('none', 'second_s'):.2f} s | <= 2 s |",
        f"| third registration, after a pause | {med('keras', 'paused_s'):.2f} s | {med('none', 'paused_s'):.2f} s | |",
        f"| {QUERIES} aggregates right after a registration, against settled | "
        f"{med('keras', 'settled_s') / med('keras', 'warming_s'):.2f}x | "
        f"{med('none', 'settled_s') / med('none', 'warming_s'):.2f}x | >= 0.9x |",
        f"| the aggregate settled, against in-process ({local:.3f} s) | "
        f"{local / med('keras', 'settled_s'):.2f}x ({med('keras', 'settled_s'):.3f} s) | "
        f"{local / med('none', 'settled_s'):.2f}x ({med('none', 'settled_s'):.3f} s) | >= 0.95x |",
        "",
        f"The same aggregate in one settled session, {QUERIES} runs each, medians: the fixed cost of a worker-path",
        "query is its wall time less the busiest worker's time reading and scoring its shares (so it holds",
        "what each share costs besides: a Ray call, and its result through the object store).",
        "",
        "| rows | worker path | in-process | speed | shares per worker | fixed cost (target <= 20 ms) |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {rows:,} | {statistics.median(f['wall_s']):.3f} s | {statistics.median(f['local_s']):.3f} s | "
            f"{statistics.median(f['local_s']) / statistics.median(f['wall_s']):.2f}x | {f['shares_per_worker']:g} | "
            f"{1000 * statistics.median(f['fixed_s']):.1f} ms |"
            for rows, f in fixed.items()
        ),
        "",
        "Ratios are speeds (higher is faster). Every run: " + json.dumps({**results, "fixed": fixed}),
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:-2]))


if __name__ == "__main__":
    sys.exit(main())
