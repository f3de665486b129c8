"""(g) of the benchmark in a process of its own: a rayudf driver (no TensorFlow in it)
scoring and saving a large table while the RSS of it and of its workers is sampled.

Example:
    $ python -m bench.memory_run TABLE MODEL OUT --ray-address ADDR   # prints one JSON line
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bench.memory import PeakRSS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory_run")
    p.add_argument("table")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--ray-address", required=True)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--memory-limit", help="DuckDB's memory_limit for the run, e.g. 400MB (default: DuckDB's)")
    args = p.parse_args(argv)

    from sql_magics import Session

    with Session(ray_address=args.ray_address, warm="none") as session:
        if args.memory_limit:
            session.sql(f"set memory_limit = '{args.memory_limit}'")
        registered = session.register_model("fbig", args.model, workers=2, batch_size=args.batch_size)
        pids = {"driver": os.getpid(), **{f"worker {i}": s["pid"] for i, s in enumerate(registered.udf.stats())}}
        with PeakRSS(pids) as peaks:
            started = time.perf_counter()
            session.sql(
                f"load parquet.`{args.table}` as big; select id, fbig(image) as p from big as scored; "
                f"save overwrite scored as parquet.`{args.out}`;"
            )
            seconds = time.perf_counter() - started
        rows = session.sql(f"select count(*) as n from read_parquet('{args.out}')")["n"][0]
    print(json.dumps({"seconds": seconds, "rows_written": int(rows), "peak_mb": peaks.peak_mb, "peak_private_mb": peaks.peak_private_mb}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
