"""``python -m bench.streaming``: a stream over arriving files against the same files as one batch query, and how long a file waits.

The same Keras MLP (784-512-10) on 2 workers scores ``--files`` Parquet files of ``--rows``
rows (id, image FLOAT[784]) and writes the scores as Parquet:

- **batch**: one query over all the files, ``save overwrite`` to one Parquet file;
- **stream, arriving**: a running stream (``duration="0"``) while the files are dropped into
  its directory (renamed in, ``--gap-ms`` apart): rows/s from the first drop to the last commit;
- **stream, a batch per file**: ``maxFilesPerTrigger="1"`` over the files all there, ``trigger="once"``:
  what a micro-batch per file costs.

Latency: ``--latency-files`` small files dropped one at a time, the stream idle at each
arrival, with ``duration="0"`` and ``duration="1"``: from the rename to the batch's commit record.
The throughput contenders take turns (rounds interleaved); the report quotes medians.

Example:
    $ python -m bench.streaming --rounds 1 --files 4      # a quick look
    $ make bench                                          # with the rest of the benchmark
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.data import build_model, start_ray, write_table

WIDTH = 784
ROW_GROUP = 1024  # several row groups a file, so one file's batch is shared by both workers
FUNCTION = "m_stream"


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.streaming", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the throughput contenders")
    p.add_argument("--files", type=int, default=20, help="files of the throughput runs")
    p.add_argument("--rows", type=int, default=5000, help="rows per file of the throughput runs")
    p.add_argument("--gap-ms", type=float, default=10.0, help="between two arriving files")
    p.add_argument("--latency-files", type=int, default=10, help="files of each latency run, one at a time")
    p.add_argument("--latency-rows", type=int, default=1000, help="rows per file of the latency runs")
    p.add_argument("--workdir", type=Path, default=Path("bench_data") / "streaming", help="where the data and streams go")
    p.add_argument("--out", type=Path, default=Path("bench/STREAMING.md"), help="the report")
    return p.parse_args(argv)


def _drop(source: Path, folder: Path) -> float:
    """Put ``source`` into ``folder`` whole (a hard link under a hidden name, renamed); the time it appeared."""
    hidden = folder / f".{source.name}.tmp"
    os.link(source, hidden)
    os.replace(hidden, folder / source.name)
    return time.time()


def _commits(checkpoint: Path) -> dict[int, tuple[float, int]]:
    """Each committed batch: when its commit was recorded (epoch seconds) and its rows."""
    done = {}
    for path in (checkpoint / "commits").glob("*.json"):
        if path.stem.isdigit():
            done[int(path.stem)] = (path.stat().st_mtime, json.loads(path.read_text())["rows"])
    return done


def _files_of(checkpoint: Path) -> dict[str, int]:
    """Which batch read each file."""
    read = {}
    for path in (checkpoint / "offsets").glob("*.json"):
        for name in json.loads(path.read_text()).get("files", []):
            read[Path(name).name] = int(path.stem)
    return read


def _wait_rows(checkpoint: Path, rows: int, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(r for _, r in _commits(checkpoint).values()) < rows:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the stream committed fewer than {rows} rows in {timeout_s:.0f} s")
        time.sleep(0.005)


class Bench:
    def __init__(self, session, work: Path) -> None:
        self.session = session
        self.work = work
        self.runs = 0

    def fresh(self, name: str) -> tuple[Path, Path, Path]:
        """An empty incoming directory, sink and checkpoint for one run."""
        self.runs += 1
        run = self.work / "runs" / f"{self.runs:03d}-{name}"
        shutil.rmtree(run, ignore_errors=True)
        (run / "in").mkdir(parents=True)
        return run / "in", run / "out", run / "ck"

    def stream_script(self, name: str, incoming: Path, out: Path, ck: Path, options: str, load: str = "") -> str:
        return f"""set streamName="{name}";
load parquet.`{incoming}` {load} as arriving;
select id, {FUNCTION}(image) as p from arriving as scored;
save append scored as parquet.`{out}` options {options} and checkpointLocation="{ck}";"""

    def batch(self, files: list[Path]) -> float:
        _, out, _ = self.fresh("batch")
        listed = ", ".join(f"'{f}'" for f in files)
        started = time.perf_counter()
        self.session.run(f"""select id, {FUNCTION}(image) as p from read_parquet([{listed}]) as scored;
save overwrite scored as parquet.`{out}.parquet`;""")
        return time.perf_counter() - started

    def per_file(self, files: list[Path]) -> float:
        incoming, out, ck = self.fresh("per_file")
        for f in files:
            _drop(f, incoming)
        started = time.perf_counter()
        self.session.run(self.stream_script("per_file", incoming, out, ck, 'trigger="once"', 'options maxFilesPerTrigger="1"'))
        return time.perf_counter() - started

    def arriving(self, files: list[Path], rows: int, gap_s: float) -> tuple[float, int]:
        """Seconds from the first drop to the last commit, and the batches the stream made."""
        incoming, out, ck = self.fresh("arriving")
        self.session.run(self.stream_script("arriving", incoming, out, ck, 'duration="0"'))
        first = None
        for f in files:
            at = _drop(f, incoming)
            first = first or at
            time.sleep(gap_s)
        _wait_rows(ck, rows)
        self.session.sql("!kill stream arriving")
        commits = _commits(ck)
        return max(t for t, _ in commits.values()) - first, len(commits)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    import ray

    from sql_magics import Session

    command = " ".join(["python -m bench.streaming", *(argv if argv is not None else sys.argv[1:])])
    work = args.workdir
    model = build_model(work / "mlp_784.keras", width=WIDTH)
    files = [write_table(work / "files" / f"part-{i:03d}.parquet", rows=args.rows, width=WIDTH, seed=i, row_group=ROW_GROUP)
             for i in range(args.files)]
    small = [write_table(work / "small" / f"one-{i:03d}.parquet", rows=args.latency_rows, width=WIDTH, seed=100 + i)
             for i in range(args.latency_files)]
    total = args.files * args.rows
    start_ray()
    session = Session(warm="none")
    session.register_model(FUNCTION, model, workers=2)
    bench = Bench(session, work)
    bench.batch(files[:2])  # warm: graphs traced, the worker path's caches filled
    results: dict[str, list[float]] = {}

    def record(key: str, value: float) -> None:
        results.setdefault(key, []).append(value)
        print(f"  {key}: {value:,.4g}", flush=True)

    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds}", flush=True)
        record("batch_rows_per_s", total / bench.batch(files))
        seconds, batches = bench.arriving(files, total, args.gap_ms / 1000)
        record("arriving_rows_per_s", total / seconds)
        record("arriving_batches", batches)
        record("per_file_rows_per_s", total / bench.per_file(files))

    latencies = {}
    for duration in ("0", "1"):
        print(f"latency, duration={duration}", flush=True)
        latencies[duration] = sorted(_latency_rows(bench, small, duration, args.latency_rows))
        print(f"  {', '.join(f'{s:.3f}' for s in latencies[duration])}", flush=True)
    session.close()
    ray.shutdown()
    _report(args, command, results, latencies)
    return 0


def _latency_rows(bench: Bench, files: list[Path], duration: str, rows: int) -> list[float]:
    incoming, out, ck = bench.fresh(f"latency_{duration}")
    bench.session.run(bench.stream_script(f"latency_{duration}", incoming, out, ck, f'duration="{duration}"'))
    arrived = {}
    for i, f in enumerate(files):
        time.sleep(0.3 + (0.37 * i) % 1.0)  # the stream idle, and arrivals spread over a duration's tick
        arrived[f.name] = _drop(f, incoming)
        _wait_rows(ck, (i + 1) * rows, timeout_s=120)
    bench.session.sql(f"!kill stream latency_{duration}")
    commits, read = _commits(ck), _files_of(ck)
    return [commits[read[name]][0] - at for name, at in arrived.items()]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _report(args, command: str, results: dict[str, list[float]], latencies: dict[str, list[float]]) -> None:
    import ray

    m = {key: statistics.median(values) for key, values in results.items()}
    batch = m["batch_rows_per_s"]
    lines = [
        "# Streaming benchmark",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.platform()}, {os.cpu_count()} cores; Python {platform.python_version()}, ray {ray.__version__}  ",
        f"Keras MLP {WIDTH}-512-10 on 2 UDFWorkers; {args.files} files of {args.rows:,} rows (FLOAT[{WIDTH}], "
        f"{ROW_GROUP:,}-row groups), scores written as Parquet. Medians of {args.rounds} interleaved rounds.",
        "",
        "| run | rows/s | against the batch query | target |",
        "| --- | --- | --- | --- |",
        f"| batch: one query over the {args.files} files | {batch:,.0f} | 1.00x | |",
        f"| stream, the files arriving {args.gap_ms:g} ms apart (duration=\"0\"; median {m['arriving_batches']:.0f} "
        f"micro-batches) | {m['arriving_rows_per_s']:,.0f} | {m['arriving_rows_per_s'] / batch:.2f}x | >= 0.9x |",
        f"| stream, a micro-batch per file (maxFilesPerTrigger=\"1\") | {m['per_file_rows_per_s']:,.0f} | "
        f"{m['per_file_rows_per_s'] / batch:.2f}x | |",
        "",
        f"Latency from a file's arrival (renamed in) to its batch's commit record: {args.latency_files} files of "
        f"{args.latency_rows:,} rows, one at a time, the stream idle at each arrival.",
        "",
        "| duration | p50 (s) | p95 (s) | max (s) |",
        "| --- | --- | --- | --- |",
    ]
    for duration, values in latencies.items():
        lines.append(f"| {duration} | {_percentile(values, 0.5):.3f} | {_percentile(values, 0.95):.3f} | {max(values):.3f} |")
    lines += ["", "All rounds:", ""]
    lines += [f"- {key}: {', '.join(f'{v:,.4g}' for v in values)}" for key, values in results.items()]
    lines += [f"- latency, duration={d}: {', '.join(f'{v:.3f}' for v in values)}" for d, values in latencies.items()]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
