"""A stream's checkpoint compacts (sql_magics/streaming/checkpoint.py): every COMPACT_EVERY batches one
compact record folds the batches before, their offsets and commits go, and a restart from it is exact:
every input row once in the sink, skipped files never read again, the schema kept, Complete totals right.

A SIGKILL right after the compact record is written is in tests/test_streaming_faults.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import write_deltalake

from sql_magics import Session
from sql_magics.streaming import checkpoint
from sql_magics.streaming.checkpoint import COMPACT_EVERY
from sql_magics.streaming.query import READ_RETRY_PAUSES_S

ROWS = 4  # rows a file


@pytest.fixture(scope="module")
def session():
    """A Session without Ray: these streams call no model."""
    with Session(warm=False) as s:
        yield s


def drop(folder: Path, index: int, *, columns: dict | None = None) -> None:
    """File ``index`` (ids ``index*ROWS`` on), its mtime ordering it after the files before."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = np.arange(index * ROWS, (index + 1) * ROWS)
    table = pa.table(columns or {"id": ids, "key": [f"k{i % 3}" for i in ids]})
    pq.write_table(table, folder / f".{index}.tmp")
    os.replace(folder / f".{index}.tmp", folder / f"f{index:03d}.parquet")
    os.utime(folder / f"f{index:03d}.parquet", (1_000_000 + index, 1_000_000 + index))


def file_stream(name: str, incoming: Path, ck: Path, out: str, *, select: str = "select id from events", options: str = "") -> str:
    return f"""
set streamName="{name}";
load parquet.`{incoming}` options maxFilesPerTrigger="1" as events;
{select} as selected;
save append selected as table.`{out}` options trigger="once" and on_bad_file="skip" and checkpointLocation="{ck}" {options};
"""


def records(ck: Path) -> list[str]:
    """The checkpoint's files, but for the lock and metadata.json."""
    return sorted(str(p.relative_to(ck)) for p in ck.rglob("*") if p.is_file() and p.name not in ("lock", "metadata.json"))


def ids(session: Session, table: str) -> list[int]:
    return [i for (i,) in session.con.execute(f"select id from {table} order by id").fetchall()]


def test_a_file_stream_compacts_and_resumes_exactly_without_reading_skipped_files_again(session, tmp_path):
    incoming, ck = tmp_path / "in", tmp_path / "ck"
    for i in range(26):
        drop(incoming, i)
    (incoming / "f003.parquet").write_bytes(b"PAR1 not really parquet")  # skipped in batch 3, long compacted
    os.utime(incoming / "f003.parquet", (1_000_003, 1_000_003))
    script = file_stream("compacting", incoming, ck, "compacted_ids")
    assert "ran once: 26 batches" in session.run(script).notice
    compact = json.loads((ck / "compact.json").read_text())
    assert compact["batch"] == 19 and len(compact["offsets"]["files"]) == 19  # batches 0-19, one file skipped
    assert [s["file"] for s in compact["offsets"]["skipped"]] == [str(incoming / "f003.parquet")]
    assert [n for n, _ in compact["offsets"]["schema"]] == ["id", "key"]
    kept = [f"{d}/{n}.json" for d in ("commits", "offsets") for n in range(20, 26)]
    assert records(ck) == sorted(["compact.json", *kept])  # bounded: batches 0-19 are one record

    drop(incoming, 26, columns={"id": [0], "other": ["x"]})  # the schema kept through compaction refuses it
    for i in range(27, 30):
        drop(incoming, i)
    result = session.run(script)
    assert "ran once: 4 batches" in result.notice
    row = session.sql("!show progress/compacting").iloc[0]
    assert row["skipped_files"] == 1  # only the new file of another schema; f003 was not read again
    skipped = json.loads((ck / "compact.json").read_text())["offsets"]["skipped"]  # batch 29 compacted too
    assert [Path(s["file"]).name for s in skipped] == ["f003.parquet", "f026.parquet"]
    assert "its columns are (id BIGINT, other VARCHAR)" in skipped[1]["reason"]
    assert ids(session, "compacted_ids") == [i for i in range(30 * ROWS) if i // ROWS not in (3, 26)]  # each row once


def test_a_checkpoint_left_by_a_crash_during_compaction_reads_the_compact_record_for_its_batches(session, tmp_path):
    incoming, ck = tmp_path / "in", tmp_path / "ck"
    for i in range(COMPACT_EVERY):
        drop(incoming, i)
    script = file_stream("interrupted", incoming, ck, "interrupted_ids")
    session.run(script)
    assert records(ck) == ["compact.json"]
    # as a crash while removing what compact.json covers leaves it: batch 9's offsets without its commit,
    # and batch 4's both (a stream's checkpoint, its lock held, reads and removes them)
    held = checkpoint.Checkpoint.open(ck, json.loads((ck / "metadata.json").read_text()))
    (ck / "offsets" / "9.json").write_text(json.dumps({"files": [str(incoming / "f009.parquet")]}))
    (ck / "offsets" / "4.json").write_text(json.dumps({"files": [str(incoming / "f004.parquet")]}))
    (ck / "commits" / "4.json").write_text(json.dumps({"rows": ROWS}))
    assert held.pending() is None and held.committed() == 9 and held.next_batch() == 10
    assert [(n, len(record["files"])) for n, record in held.offsets()] == [(9, 10)]  # the compact record, once
    held.release()
    for i in range(COMPACT_EVERY, COMPACT_EVERY + 2):
        drop(incoming, i)
    assert "ran once: 2 batches" in session.run(script).notice
    assert not (ck / "commits" / "9.json").exists()  # batch 9 was not taken for one to run again
    assert sorted(p.name for p in (ck / "offsets").iterdir()) == ["10.json", "11.json"]  # the leftovers removed at open
    assert ids(session, "interrupted_ids") == list(range((COMPACT_EVERY + 2) * ROWS))


def test_an_old_checkpoint_without_a_compact_record_resumes_then_compacts(session, tmp_path, monkeypatch):
    incoming, ck = tmp_path / "in", tmp_path / "ck"
    for i in range(12):
        drop(incoming, i)
    script = file_stream("old", incoming, ck, "old_ids")
    with monkeypatch.context() as before:
        before.setattr(checkpoint, "COMPACT_EVERY", 1000)  # as a checkpoint written before compaction was
        session.run(script)
    assert not (ck / "compact.json").exists() and len(list((ck / "offsets").iterdir())) == 12
    for i in range(12, 21):
        drop(incoming, i)
    assert "ran once: 9 batches" in session.run(script).notice
    assert json.loads((ck / "compact.json").read_text())["batch"] == 19
    assert sorted(p.name for p in (ck / "offsets").iterdir()) == ["20.json"]
    assert ids(session, "old_ids") == list(range(21 * ROWS))


def test_complete_mode_after_compaction_totals_every_row(session, tmp_path):
    incoming, ck = tmp_path / "in", tmp_path / "ck"
    for i in range(25):
        drop(incoming, i)
    select = "select key, count(*) as n, sum(id) as s from events group by key"
    script = file_stream("totals", incoming, ck, "compact_totals", select=select, options='and mode="Complete"')

    def expected(files: int) -> list[tuple]:
        frame = pd.DataFrame({"id": range(files * ROWS)})
        frame["key"] = [f"k{i % 3}" for i in frame["id"]]
        grouped = frame.groupby("key")["id"].agg(["size", "sum"]).reset_index()
        return [(k, n, s) for k, n, s in grouped.itertuples(index=False)]

    session.run(script)
    assert (ck / "compact.json").exists()
    assert session.con.execute("select key, n, s from compact_totals order by key").fetchall() == expected(25)
    drop(incoming, 25)
    session.run(script)  # a restart: the compact record, then the batches after it
    assert session.con.execute("select key, n, s from compact_totals order by key").fetchall() == expected(26)


def test_a_delta_source_compacts_and_resumes_exactly(session, tmp_path):
    source, ck = tmp_path / "events", tmp_path / "ck"
    script = f"""
set streamName="delta_compacting";
load delta.`{source}` options mode="path" as events;
select id from events as selected;
save append selected as table.`delta_compacted` options trigger="once" and checkpointLocation="{ck}";
"""
    for version in range(25):  # a batch per version
        write_deltalake(str(source), pa.table({"id": [2 * version, 2 * version + 1]}), mode="append")
        assert "ran once: 1 batches" in session.run(script).notice
    assert json.loads((ck / "compact.json").read_text()) == {"batch": 19, "offsets": {"from": 0, "to": 19, "snapshot": True}}
    assert len(records(ck)) <= 2 * COMPACT_EVERY + 1
    assert "ran once: 0 batches" in session.run(script).notice
    assert ids(session, "delta_compacted") == list(range(50))


def test_a_mock_stream_resumes_from_its_compact_record(session, tmp_path):
    ck = tmp_path / "ck"
    session.con.execute("create or replace table compacting_mock as select range as id from range(40) order by id")
    script = f"""
set streamName="mock_compacting";
load mockStream.`compacting_mock` options stepSizeRange="1-2" as events;
select id from events as selected;
save append selected as table.`mock_compacted` options trigger="once" and checkpointLocation="{ck}";
"""
    batches = int(session.run(script).notice.split("ran once: ")[1].split()[0])
    assert batches >= 20 and json.loads((ck / "compact.json").read_text())["offsets"]["start"] == 0
    assert "ran once: 0 batches" in session.run(script).notice  # resumed at the end, not at row 0
    assert ids(session, "mock_compacted") == list(range(40))


def test_the_docs_give_the_compact_interval_and_the_read_retry_pauses():
    doc = (Path(__file__).parent.parent / "docs" / "streaming.md").read_text()
    assert f"Every {COMPACT_EVERY} batches (Spark's default compact interval)" in doc
    *first, last = (f"{pause:g}" for pause in READ_RETRY_PAUSES_S)
    assert f"the batch is tried again after {', '.join(first)} and {last} s" in doc
