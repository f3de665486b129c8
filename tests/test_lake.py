"""The Delta lake (sql_magics.tables.lake) driven through Session.sql: real DuckDB, real delta-rs, no Ray."""

from __future__ import annotations

import json
import re

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

from sql_magics import ExecutionError, Session
from sql_magics.tables.lake import HISTORY_COLUMNS, TABLE_COLUMNS
from udf_engine.models.store import save_model

# A query that fails half way: DuckDB has produced rows (several Arrow batches) before the error.
FAILING = "select case when i > 500000 then error('boom') else i end as {col} from range(1000000) t(i)"


@pytest.fixture
def lake(tmp_path):
    return tmp_path / "lake"


@pytest.fixture
def s(lake):
    with Session() as session:
        session.sql(f'set lake.root="{lake}"')
        yield session


def rows(s: Session, query: str) -> list[tuple]:
    return s.con.execute(query).fetchall()


def test_save_and_load_a_lake_table(s, lake):
    s.sql("select range as id, 'n' || range as name from range(3) as t; save overwrite t as delta.`db.t`")
    assert (lake / "db" / "t" / "_delta_log").is_dir()
    s.sql("load delta.`db.t` as back")
    assert rows(s, "select * from back order by id") == [(0, "n0"), (1, "n1"), (2, "n2")]
    assert rows(s, "select table_type from information_schema.tables where table_name = 'back'") == [("BASE TABLE",)]


def test_a_bare_table_name_is_in_the_default_database(s, lake):
    s.sql("select 7 as x from range(1) as t; save t as delta.`plain`; load delta.`default.plain` as back")
    assert (lake / "default" / "plain" / "_delta_log").is_dir() and rows(s, "select x from back") == [(7,)]


def test_overwrite_makes_a_new_version_and_append_adds_rows(s, lake):
    s.sql("select range as i from range(2) as a; save overwrite a as delta.`db.t`")
    s.sql("select range + 10 as i from range(2) as b; save overwrite b as delta.`db.t`")
    s.sql("select 99::bigint as i from range(1) as c; save append c as delta.`db.t`; load delta.`db.t` as back")
    assert rows(s, "select i from back order by i") == [(10,), (11,), (99,)]
    assert DeltaTable(str(lake / "db" / "t")).version() == 2


def test_error_if_exists_is_the_default_and_ignore_leaves_the_table(s, lake):
    s.sql("select 1 as x from range(1) as one; select 2 as x from range(1) as two; save one as delta.`db.t`")
    with pytest.raises(ExecutionError, match=re.escape(f"line 1: save delta: db.t already exists at {lake / 'db' / 't'} (use save")):
        s.sql("save errorIfExists two as delta.`db.t`")
    s.sql("save ignore two as delta.`db.t`; save ignore two as delta.`db.fresh`; load delta.`db.t` as t; load delta.`db.fresh` as f")
    assert rows(s, "select (select x from t), (select x from f)") == [(1, 2)]
    assert DeltaTable(str(lake / "db" / "t")).version() == 0


def test_append_with_id_cols_merges(s, lake):
    s.sql("select range as id, 'old' || range as v from range(3) as base; save overwrite base as delta.`db.m`")
    s.sql("select * from (values (1, 'new1'), (5, 'new5')) as u(id, v) as upd; save append upd as delta.`db.m` where idCols=\"id\"")
    s.sql("load delta.`db.m` as back")
    assert rows(s, "select id, v from back order by id") == [(0, "old0"), (1, "new1"), (2, "old2"), (5, "new5")]
    assert DeltaTable(str(lake / "db" / "m")).history(1)[0]["operation"] == "MERGE"


def test_merge_on_two_columns_and_byzer_and_clause(s):
    s.sql("select * from (values (1, 'a', 10), (1, 'b', 20)) as t(k1, k2, n) as base; save overwrite base as delta.`db.m`")
    s.sql("select * from (values (1, 'b', 21), (2, 'b', 30)) as t(k1, k2, n) as upd; save append upd as delta.`db.m` and idCols=\"k1, k2\"")
    s.sql("load delta.`db.m` as back")
    assert rows(s, "select k1, k2, n from back order by k1, k2") == [(1, "a", 10), (1, "b", 21), (2, "b", 30)]


def test_merge_into_a_missing_table_creates_it(s):
    s.sql("select 1 as id from range(1) as t; save append t as delta.`db.new` where idCols=\"id\"; load delta.`db.new` as back")
    assert rows(s, "select id from back") == [(1,)]


def test_partition_by_writes_partition_directories(s, lake):
    s.sql("select range as i, case when range % 2 = 0 then 'even' else 'odd' end as k from range(6) as t")
    s.sql("save overwrite t as delta.`db.p` partitionBy k; load delta.`db.p` as back")
    path = lake / "db" / "p"
    assert sorted(d.name for d in path.iterdir() if d.name.startswith("k=")) == ["k=even", "k=odd"]
    assert DeltaTable(str(path)).metadata().partition_columns == ["k"]
    assert rows(s, "select i, k from back order by i") == rows(s, "select i, k from t order by i")


def test_version_time_travel(s):
    s.sql("select 1 as x from range(1) as a; save overwrite a as delta.`db.t`")
    s.sql("select 2 as x from range(1) as b; save overwrite b as delta.`db.t`")
    s.sql("load delta.`db.t` where version=\"0\" as v0; load delta.`db.t` where versionAsOf=\"1\" as v1; load delta.`db.t` as latest")
    assert rows(s, "select (select x from v0), (select x from v1), (select x from latest)") == [(1, 2, 2)]


def test_starting_and_ending_version_load_each_snapshot_tagged(s):
    s.sql("select range as k from range(2) as a; save overwrite a as delta.`db.t`")  # version 0: 0, 1
    s.sql("select 2::bigint as k from range(1) as b; save append b as delta.`db.t`")  # version 1: 0, 1, 2
    s.sql("select 3::bigint as k from range(1) as c; save append c as delta.`db.t`")  # version 2: 0, 1, 2, 3
    s.sql('load delta.`db.t` where startingVersion="0" and endingVersion="2" as r')
    assert rows(s, "select __delta_version__, k from r order by 1, 2") == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert rows(s, "select data_type from information_schema.columns where table_name = 'r' and column_name = '__delta_version__'") == [
        ("BIGINT",)
    ]


def test_version_errors_name_the_versions_there_are(s, lake):
    s.sql("select 1 as x from range(1) as a; save overwrite a as delta.`db.t`; save overwrite a as delta.`db.t`")
    with pytest.raises(ExecutionError, match=re.escape("load delta: db.t has no version 5 (versions: 0-1)")):
        s.sql('load delta.`db.t` where version="5" as t')
    with pytest.raises(ExecutionError, match=re.escape("load delta: db.t has no version 2 (versions: 0-1)")):
        s.sql('load delta.`db.t` where startingVersion="1" and endingVersion="3" as t')
    with pytest.raises(ExecutionError, match="startingVersion and endingVersion go together"):
        s.sql('load delta.`db.t` where startingVersion="0" as t')
    with pytest.raises(ExecutionError, match=re.escape("endingVersion (1) is exclusive, so it must be greater than startingVersion (1)")):
        s.sql('load delta.`db.t` where startingVersion="1" and endingVersion="1" as t')
    with pytest.raises(ExecutionError, match=re.escape("version must be a version number (0, 1, ...), not 'latest'")):
        s.sql('load delta.`db.t` where version="latest" as t')


@pytest.mark.parametrize(
    ("mode", "column", "clause"),
    [("overwrite", "i", ""), ("append", "i", ""), ("append", "id", ' where idCols="id"')],
    ids=["overwrite", "append", "merge"],
)
def test_a_failing_save_leaves_the_table_at_its_version(s, lake, mode, column, clause):
    s.sql(f"select range as {column} from range(3) as good; save overwrite good as delta.`db.t`")
    s.sql(f"{FAILING.format(col=column)} as bad")
    with pytest.raises(ExecutionError, match=r"line 1: save delta: .*boom.*; db\.t is still at version 0$"):
        s.sql(f"save {mode} bad as delta.`db.t`{clause}")
    assert DeltaTable(str(lake / "db" / "t")).version() == 0
    s.sql("load delta.`db.t` as back")
    assert rows(s, f"select {column} from back order by 1") == [(0,), (1,), (2,)]


def test_a_failing_first_save_writes_no_table(s, lake):
    s.sql(f"{FAILING.format(col='i')} as bad")
    with pytest.raises(ExecutionError, match=r"boom.*; nothing was written$"):
        s.sql("save overwrite bad as delta.`db.t`")
    assert not DeltaTable.is_deltatable(str(lake / "db" / "t"))


def test_delta_show_tables(s, lake):
    s.sql("select 1 as x from range(1) as t; save t as delta.`db1.b`; save t as delta.`db1.a`; save t as delta.`db2.c`")
    (lake / "db2" / "not_delta").mkdir()
    frame = s.sql("!delta show tables")
    assert list(frame.columns) == TABLE_COLUMNS
    assert frame.to_dict("records") == [
        {"database": "db1", "table": "a", "path": str(lake / "db1" / "a")},
        {"database": "db1", "table": "b", "path": str(lake / "db1" / "b")},
        {"database": "db2", "table": "c", "path": str(lake / "db2" / "c")},
    ]


def test_delta_show_tables_of_a_missing_root_is_empty(tmp_path):
    with Session() as s:
        frame = s.sql(f'set lake.root="{tmp_path / "none"}"; !delta show tables')
    assert frame.empty and list(frame.columns) == TABLE_COLUMNS


def test_delta_info_and_history(s):
    s.sql("select 1 as id from range(1) as t; save overwrite t as delta.`db.t`; save append t as delta.`db.t`")
    s.sql('save append t as delta.`db.t` where idCols="id"')
    info = s.sql("!delta info db.t")
    assert list(info.columns) == HISTORY_COLUMNS
    assert info[["version", "operation"]].values.tolist() == [[2, "MERGE"], [1, "WRITE"], [0, "WRITE"]]
    assert [json.loads(p).get("mode") for p in info["operationParameters"]] == [None, "Append", "Overwrite"]
    assert json.loads(info["operationMetrics"][1])["num_added_rows"] == 1
    assert info["timestamp"].is_monotonic_decreasing and isinstance(info["timestamp"][0], pd.Timestamp)
    pd.testing.assert_frame_equal(s.sql("!delta history db.t"), info)


def test_delta_command_errors(s, lake):
    supported = "(supported: !delta show tables, !delta info <table>, !delta history <table>)"
    with pytest.raises(ExecutionError, match=re.escape(f"!delta drop db.t: unknown sub-command {supported}")):
        s.sql("!delta drop db.t")
    with pytest.raises(ExecutionError, match=re.escape(f"!delta info: no Delta table db.nope (looked for {lake / 'db' / 'nope'} under")):
        s.sql("!delta info db.nope")


def test_our_table_reads_in_delta_rs_and_theirs_reads_here(s, tmp_path, lake):
    s.sql("select range as i, range * 0.5 as f, 'r' || range as s from range(4) as t; save overwrite t as delta.`db.ours`")
    ours = DeltaTable(str(lake / "db" / "ours")).to_pyarrow_table().sort_by("i")
    assert ours.to_pydict() == {"i": [0, 1, 2, 3], "f": [0.0, 0.5, 1.0, 1.5], "s": ["r0", "r1", "r2", "r3"]}
    theirs = tmp_path / "theirs"
    write_deltalake(str(theirs), pa.table({"a": [3, 1, 2], "b": ["c", "a", "b"]}), partition_by=["b"])
    s.sql(f"load delta.`{theirs}` as back")
    assert rows(s, "select a, b from back order by a") == [(1, "a"), (2, "b"), (3, "c")]


def test_load_and_save_by_relative_path(s, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_deltalake("ext/t", pa.table({"x": [1]}))
    write_deltalake("plain_dir", pa.table({"x": [2]}))  # no '/', but an existing directory: a path
    s.sql('select 3 as x from range(1) as t; save t as delta.`here` where mode="path"')
    s.sql("load delta.`ext/t` as a; load delta.`plain_dir` as b; load delta.`here` as c")
    assert rows(s, "select (select x from a), (select x from b), (select x from c)") == [(1, 2, 3)]
    assert DeltaTable.is_deltatable(str(tmp_path / "here"))


def test_the_default_root_is_lake_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Session() as s:
        s.sql("select 1 as x from range(1) as t; save t as delta.`db.t`")
    assert DeltaTable.is_deltatable(str(tmp_path / "lake" / "db" / "t"))


@pytest.mark.parametrize("shape", ["model_store", "streaming_tar"])
def test_model_tables_round_trip_and_keep_every_version(s, tmp_path, shape):
    def model_table(payload: bytes, name: str):
        if shape == "model_store":
            (tmp_path / f"{name}.pkl").write_bytes(payload)
            return save_model(tmp_path / f"{name}.pkl", tmp_path / name)
        half = len(payload) // 2
        chunks = pa.table({"start": [0, half], "offset": [half, len(payload) - half], "value": [payload[:half], payload[half:]]})
        pq.write_table(chunks, tmp_path / f"{name}.parquet")
        return tmp_path / f"{name}.parquet"

    first, second = bytes(range(256)) * 64, b"\x00\xff" * 5000
    s.sql(f"load parquet.`{model_table(first, 'm1')}` as m1; save overwrite m1 as delta.`ai_model.m`")
    s.sql(f"load parquet.`{model_table(second, 'm2')}` as m2; save overwrite m2 as delta.`ai_model.m`")
    s.sql('load delta.`ai_model.m` where version="0" as old; load delta.`ai_model.m` as new')
    for table, original, payload in [("old", "m1", first), ("new", "m2", second)]:
        assert rows(s, f"select * from {table} order by all") == rows(s, f"select * from {original} order by all")
        chunks = rows(s, f"select value from {table} where \"offset\" > 0 order by start")
        assert b"".join(v for (v,) in chunks) == payload
    assert rows(s, "select data_type from information_schema.columns where table_name = 'old' and column_name = 'value'") == [("BLOB",)]


def test_missing_tables_and_bad_names_and_options(s, lake, tmp_path):
    missing = f"load delta: no Delta table db.nope (looked for {lake / 'db' / 'nope'} under the lake root {lake}; !delta show tables"
    with pytest.raises(ExecutionError, match=re.escape(missing)):
        s.sql("load delta.`db.nope` as t")
    with pytest.raises(ExecutionError, match=re.escape(f"load delta: no Delta table at {tmp_path / 'none'}")):
        s.sql(f"load delta.`{tmp_path / 'none'}` as t")
    with pytest.raises(ExecutionError, match=re.escape("delta: 'a.b.c' is neither db.table nor a path")):
        s.sql("load delta.`a.b.c` as t")
    s.sql("select 1 as id from range(1) as t")
    unknown = "save delta: option 'idcols' is not supported here (supported: idCols, mergeSchema"
    with pytest.raises(ExecutionError, match=re.escape(unknown)):
        s.sql('save append t as delta.`db.t` where idcols="id"')
    unknown = "load delta: option 'checkpointLocation' is not supported here (supported: version,"
    with pytest.raises(ExecutionError, match=re.escape(unknown)):
        s.sql('load delta.`db.t` where checkpointLocation="/tmp/c" as x')
    with pytest.raises(ExecutionError, match=re.escape("idCols merges rows into the table, so it needs save append (not overwrite)")):
        s.sql('save overwrite t as delta.`db.t` where idCols="id"')
    with pytest.raises(ExecutionError, match=re.escape("idCols 'key' is not a column of the saved table (columns: id)")):
        s.sql('save overwrite t as delta.`db.t`; save append t as delta.`db.t` where idCols="key"')


def test_schema_changes_need_an_option(s):
    s.sql("select 1 as a from range(1) as one; select 2 as a, 'x' as b from range(1) as two; save one as delta.`db.t`")
    hint = '(where mergeSchema="true" adds columns, overwriteSchema="true" replaces the schema); db.t is still at version 0'
    with pytest.raises(ExecutionError, match=r"save delta: db\.t: Cannot cast schema.* " + re.escape(hint) + "$"):
        s.sql("save append two as delta.`db.t`")
    s.sql('save append two as delta.`db.t` where mergeSchema="true"; load delta.`db.t` as merged')
    assert rows(s, "select a, b from merged order by a") == [(1, None), (2, "x")]
    s.sql('select 9 as z from range(1) as three; save overwrite three as delta.`db.t` where overwriteSchema="true"; load delta.`db.t` as o')
    assert rows(s, "select * from o") == [(9,)]


def test_schema_options_read_yes_as_true_and_a_bad_one_is_named(s):
    s.sql("select 1 as a from range(1) as one; select 2 as a, 'x' as b from range(1) as two; save one as delta.`db.t`")
    with pytest.raises(ExecutionError) as refused:
        s.sql('save append two as delta.`db.t` where mergeSchema="maybe"')
    assert str(refused.value) == "line 1: option mergeSchema: expected true or false (or 1/0, yes/no, on/off), got 'maybe'"
    s.sql('save append two as delta.`db.t` where mergeSchema="yes"; load delta.`db.t` as merged')
    assert rows(s, "select a, b from merged order by a") == [(1, None), (2, "x")]
    with pytest.raises(ExecutionError, match=re.escape("load delta: option version given twice (as 'versionAsOf')")):
        s.sql('load delta.`db.t` where version="0" and versionAsOf="1" as both')


def test_a_broken_table_is_one_clear_error(s, lake):
    log = lake / "db" / "bad" / "_delta_log"
    log.mkdir(parents=True)
    (log / "00000000000000000000.json").write_text('{"garbage": 1}\n')
    reason = "Kernel error: No table metadata or protocol found in delta log."
    with pytest.raises(ExecutionError, match=re.escape(f"line 1: load delta: db.bad: {reason}")):
        s.sql("load delta.`db.bad` as t")
    with pytest.raises(ExecutionError, match=re.escape(f"line 1: !delta info: db.bad: {reason}")):
        s.sql("!delta info db.bad")
