"""A stream SIGKILLed at each point of a micro-batch, then restarted with the same checkpoint,
writes every input row exactly once: ``rayudf run`` as a real subprocess, killed by the test
hook ``RAYUDF_STREAM_CRASH="<point>:<batch>"`` (sql_magics/streaming/faults.py).
"""

from __future__ import annotations

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

from sql_magics.streaming.faults import CRASH_VARIABLE, POINTS

from conftest import WORKER_CPUS, Weighted, save_pickled

RAYUDF = str(Path(sys.executable).with_name("rayudf"))
FILES, ROWS = 3, 10  # one batch per file (maxFilesPerTrigger="1")
# The points a sink reaches: a Delta sink commits in one step, a file sink moves its files one by one.
SINK_POINTS = {"rate": [p for p in POINTS if p != "sink_file_moved"], "parquet": list(POINTS)}


def incoming(folder: Path) -> Path:
    folder.mkdir()
    for i in range(FILES):
        ids = np.arange(i * ROWS, (i + 1) * ROWS)
        pq.write_table(pa.table({"id": ids, "a": ids * 0.5, "b": -ids * 1.0, "key": [f"k{j % 3}" for j in ids]}), folder / f"f{i}.parquet")
        os.utime(folder / f"f{i}.parquet", (1_000_000 + i, 1_000_000 + i))  # file order is batch order
    return folder


def run_stream(script: Path, *, crash: str | None = None, args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != CRASH_VARIABLE}
    if crash:
        env[CRASH_VARIABLE] = crash
    return subprocess.run([RAYUDF, "run", str(script), *args], capture_output=True, text=True, timeout=300, env=env)


def stream_script(tmp_path: Path, sink: str, select: str = "select id, a + b * 10 as p, key from events as scored") -> tuple[Path, Path]:
    source, out, ck = incoming(tmp_path / "in"), tmp_path / "out", tmp_path / "ck"
    script = tmp_path / "stream.sql"
    script.write_text(f"""set streamName="crashing";
load parquet.`{source}` options maxFilesPerTrigger="1" as events;
{select};
save append scored as {sink}.`{out}` options trigger="once" and checkpointLocation="{ck}" partitionBy key;
""")
    return script, out


def written(sink: str, out: Path) -> pd.DataFrame:
    if sink == "rate":
        rows = DeltaTable(str(out)).to_pandas()
    else:
        rows = pq.ParquetDataset(str(out)).read().to_pandas()
    return rows[["id", "p"]].sort_values("id", ignore_index=True)


def exact(scores) -> pd.DataFrame:
    return pd.DataFrame({"id": np.arange(FILES * ROWS), "p": scores})


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
