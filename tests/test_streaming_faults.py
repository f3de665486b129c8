"""A stream SIGKILLed at each point of a micro-batch (or of a checkpoint's compaction), then restarted
with the same checkpoint, writes every input row exactly once: ``rayudf run`` as a real subprocess,
killed by the test hook ``RAYUDF_STREAM_CRASH="<point>:<batch>"`` (sql_magics/streaming/faults.py).
A read that fails for a reason that may pass (``RAYUDF_STREAM_READ_FAULT``: the reader's own open
fails with EMFILE) is retried, never taken for a bad file.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from sql_magics.errors import ExecutionError
from sql_magics.streaming.checkpoint import COMPACT_EVERY
from sql_magics.streaming.faults import COMPACTION_POINTS, CRASH_VARIABLE, POINTS, READ_FAULT_VARIABLE
from sql_magics.streaming.query import READ_RETRY_PAUSES_S
from sql_magics.streaming.read_errors import malformed, transient

from conftest import WORKER_CPUS, Weighted, save_pickled

RAYUDF = str(Path(sys.executable).with_name("rayudf"))
FILES, ROWS = 3, 10  # one batch per file (maxFilesPerTrigger="1")
# The points a sink reaches: a Delta sink commits in one step, a file sink moves its files one by one.
SINK_POINTS = {"rate": [p for p in POINTS if p != "sink_file_moved"], "parquet": list(POINTS)}


def incoming(folder: Path, files: int = FILES) -> Path:
    folder.mkdir()
    for i in range(files):
        ids = np.arange(i * ROWS, (i + 1) * ROWS)
        pq.write_table(pa.table({"id": ids, "a": ids * 0.5, "b": -ids * 1.0, "key": [f"k{j % 3}" for j in ids]}), folder / f"f{i}.parquet")
        os.utime(folder / f"f{i}.parquet", (1_000_000 + i, 1_000_000 + i))  # file order is batch order
    return folder


def run_stream(
    script: Path, *, crash: str | None = None, read_fault: str | None = None, args: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (CRASH_VARIABLE, READ_FAULT_VARIABLE)}
    if crash:
        env[CRASH_VARIABLE] = crash
    if read_fault:
        env[READ_FAULT_VARIABLE] = read_fault
    return subprocess.run([RAYUDF, "run", str(script), *args], capture_output=True, text=True, timeout=300, env=env)


def stream_script(
    tmp_path: Path, sink: str, select: str = "select id, a + b * 10 as p, key from events as scored", *, files: int = FILES,
    options: str = "",
) -> tuple[Path, Path]:
    source, out, ck = incoming(tmp_path / "in", files), tmp_path / "out", tmp_path / "ck"
    script = tmp_path / "stream.sql"
    script.write_text(f"""set streamName="crashing";
load parquet.`{source}` options maxFilesPerTrigger="1" as events;
{select};
save append scored as {sink}.`{out}` options trigger="once" and checkpointLocation="{ck}" {options} partitionBy key;
""")
    return script, out


def written(sink: str, out: Path) -> pd.DataFrame:
    if sink == "rate":
        rows = DeltaTable(str(out)).to_pandas()
    else:
        rows = pq.ParquetDataset(str(out)).read().to_pandas()
    return rows[["id", "p"]].sort_values("id", ignore_index=True)


def exact(scores) -> pd.DataFrame:
    return pd.DataFrame({"id": np.arange(len(scores)), "p": scores})


def scored(files: int = FILES) -> pd.DataFrame:
    """What the default select writes for ``files`` files: p = a + 10 b = -9.5 id."""
    ids = np.arange(files * ROWS)
    return exact(ids * 0.5 - ids * 10.0)


def records(ck: Path, directory: str) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((ck / directory).iterdir())}


@pytest.mark.parametrize(("sink", "point"), [(sink, point) for sink, points in SINK_POINTS.items() for point in points])
def test_a_crash_at_each_point_then_a_restart_writes_each_row_once(tmp_path, sink, point):
    script, out = stream_script(tmp_path, sink)
    crashed = run_stream(script, crash=f"{point}:1")
    assert crashed.returncode == -9, crashed.stderr  # killed in batch 1, after batch 0 committed
    restarted = run_stream(script)
    assert restarted.returncode == 0, restarted.stderr
    ids = np.arange(FILES * ROWS)
    pd.testing.assert_frame_equal(written(sink, out), exact(ids * 0.5 - ids * 10.0))  # no row lost, none twice
    if sink == "rate":
        assert DeltaTable(str(out)).version() == FILES - 1  # one commit per batch, a re-run batch's skipped


def test_a_scoring_stream_killed_mid_commit_restarts_to_the_models_exact_rows(tmp_path, ray_cluster, model_dir):
    address = ray_cluster.get_runtime_context().gcs_address
    model = save_pickled(model_dir / "crash_wsum.pkl", Weighted((1.0, 10.0)))
    script, out = stream_script(tmp_path, "parquet", "select id, wsum(a, b) as p, key from events as scored")
    register = f'register pickle.`{model}` as wsum where workers="1" and num_cpus="{WORKER_CPUS}" and returns="DOUBLE";\n'
    script.write_text(register + script.read_text())
    crashed = run_stream(script, crash="sink_file_moved:2", args=("--ray-address", address))
    assert crashed.returncode == -9, crashed.stderr
    restarted = run_stream(script, args=("--ray-address", address))
    assert restarted.returncode == 0, restarted.stderr
    assert restarted.stdout.count("stream crashing: batch 2 committed 10 rows") == 1  # only the cut-short batch ran again
    frame = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "in").iterdir())])
    pd.testing.assert_frame_equal(written("parquet", out), exact(Weighted((1.0, 10.0)).predict(frame[["a", "b"]].to_numpy())))


@pytest.mark.parametrize("point", ["staged", "sink_committed"])
def test_a_complete_mode_stream_killed_then_restarted_holds_the_aggregate_over_every_row(tmp_path, point):
    script, out = stream_script(tmp_path, "rate", "select key, count(*) as n, sum(id) as s from events group by key as scored")
    script.write_text(script.read_text().replace('trigger="once"', 'mode="Complete" and trigger="once"').replace(" partitionBy key", ""))
    crashed = run_stream(script, crash=f"{point}:1")
    assert crashed.returncode == -9, crashed.stderr
    restarted = run_stream(script)
    assert restarted.returncode == 0, restarted.stderr
    ids = pd.DataFrame({"id": np.arange(FILES * ROWS)})
    ids["key"] = [f"k{j % 3}" for j in ids["id"]]
    expected = ids.groupby("key").agg(n=("id", "size"), s=("id", "sum")).reset_index()
    written = DeltaTable(str(out)).to_pandas().sort_values("key", ignore_index=True)
    pd.testing.assert_frame_equal(written, expected, check_dtype=False)


# -- compaction --------------------------------------------------------------------------------


@pytest.mark.parametrize("point", COMPACTION_POINTS)
def test_a_crash_during_a_compaction_then_a_restart_writes_each_row_once(tmp_path, point):
    sink = "parquet"  # the checkpoint's compaction is the same whatever the sink
    files = COMPACT_EVERY + 2
    script, out = stream_script(tmp_path, sink, files=files)
    crashed = run_stream(script, crash=f"{point}:{COMPACT_EVERY - 1}")
    assert crashed.returncode == -9, crashed.stderr
    ck = tmp_path / "ck"
    assert (ck / "compact.json").exists() and len(records(ck, "offsets")) == COMPACT_EVERY  # nothing removed yet
    restarted = run_stream(script)
    assert restarted.returncode == 0, restarted.stderr
    assert restarted.stdout.count("committed") == 2  # batches 10 and 11: none of the compacted ones again
    pd.testing.assert_frame_equal(written(sink, out), scored(files))
    assert list(records(ck, "offsets")) == [f"{COMPACT_EVERY}.json", f"{COMPACT_EVERY + 1}.json"]


# -- transient read errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "on_bad_file", "retries"),
    [("probe:2", "skip", 2), ("stage:2", "fail", 2), ("stage:1,culprit:1", "skip", 1)],
)
def test_a_read_that_fails_for_a_while_is_retried_and_every_row_written_once(tmp_path, fault, on_bad_file, retries):
    script, out = stream_script(tmp_path, "parquet", options=f'and on_bad_file="{on_bad_file}"')
    run = run_stream(script, read_fault=fault)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("Too many open files (try") == retries  # DuckDB's own open failed: EMFILE, then retried
    pd.testing.assert_frame_equal(written("parquet", out), scored())
    assert not any("skipped" in record for record in records(tmp_path / "ck", "offsets").values())


def test_a_read_that_keeps_failing_stops_the_stream_naming_the_file_and_a_restart_reads_it(tmp_path):
    """With on_bad_file="skip", where a transient error used to mark the file bad for good; it waits out
    every retry (15.5 s), so it runs once: the retries of a batch's staging are the same loop."""
    script, out = stream_script(tmp_path, "parquet", options='and on_bad_file="skip"')
    source, later, ck = tmp_path / "in", tmp_path / "later", tmp_path / "ck"
    later.mkdir()
    for name in ("f1.parquet", "f2.parquet"):
        os.replace(source / name, later / name)
    assert run_stream(script).returncode == 0  # batch 0: f0
    for name in ("f1.parquet", "f2.parquet"):
        os.replace(later / name, source / name)

    failed = run_stream(script, read_fault="probe:always")
    assert failed.returncode == 1, failed.stderr
    assert str(source / "f1.parquet") in failed.stderr and "Too many open files" in failed.stderr
    assert f"still so after {len(READ_RETRY_PAUSES_S) + 1} tries" in failed.stderr
    pd.testing.assert_frame_equal(written("parquet", out), scored(1))  # nothing of batch 1
    assert list(records(ck, "commits")) == ["0.json"]
    offsets = records(ck, "offsets")
    assert "1.json" not in offsets  # a probe fails before the batch records its input
    assert not any("skipped" in record for record in offsets.values())  # f1 is not marked bad

    restarted = run_stream(script)
    assert restarted.returncode == 0, restarted.stderr
    pd.testing.assert_frame_equal(written("parquet", out), scored())
    assert not any("skipped" in record for record in records(ck, "offsets").values())


def test_what_duckdb_raises_for_a_malformed_file_is_told_from_a_failed_read(tmp_path):
    import duckdb

    table = pa.table({"x": np.arange(20_000), "s": [f"v{i}" for i in range(20_000)]})
    pq.write_table(table, tmp_path / "good.parquet", row_group_size=5_000)
    data = (tmp_path / "good.parquet").read_bytes()
    footer = data[-(int.from_bytes(data[-8:-4], "little") + 8):]
    files = {
        "not_parquet.parquet": b"PAR1 not really parquet",
        "truncated.parquet": data[: len(data) // 2] + footer,  # its footer points past its end
        "corrupt_page.parquet": data[:1_000] + bytes(4_000) + data[5_000:],
        "conversion.csv": b"a,b\n" + b"1,2\n" * 50_000 + b"x,2\n",  # past the rows DuckDB samples for types
        "columns.csv": b"a,b\n" + b"1,2\n" * 50_000 + b"1,2,3,4\n",
        "malformed.json": b'{"a": 1}\n{"a": \n',
    }
    con = duckdb.connect()
    errors = {}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        reader = {"parquet": "read_parquet", "csv": "read_csv", "json": "read_json_auto"}[name.rsplit(".", 1)[1]]
        with pytest.raises(duckdb.Error) as raised:
            con.sql(f"select * from {reader}('{tmp_path / name}')").to_arrow_table()
        errors[name] = raised.value
    assert {name: malformed(err) for name, err in errors.items()} == dict.fromkeys(files, True)
    assert not any(transient(err) for err in errors.values())

    with pytest.raises(duckdb.Error) as gone:
        con.sql(f"select * from read_parquet('{tmp_path / 'removed.parquet'}')").fetchall()
    con.execute("set memory_limit = '4MB'")
    with pytest.raises(duckdb.Error) as memory:
        con.sql("select list(range) from range(10000000)").fetchall()
    try:
        try:
            raise gone.value
        except duckdb.Error:
            raise ExecutionError("IO Error: No files found") from None  # as the session wraps it
    except ExecutionError as err:
        wrapped = err
    failed_reads = [gone.value, memory.value, wrapped, OSError(errno.EIO, "Input/output error"),
                    OSError(errno.ESTALE, "Stale file handle"), duckdb.InterruptException("INTERRUPT Error: Interrupted!")]
    assert [type(err).__name__ for err in failed_reads[:2]] == ["IOException", "OutOfMemoryException"]
    assert [transient(err) for err in failed_reads] == [True] * len(failed_reads)
    assert not any(malformed(err) for err in failed_reads)
