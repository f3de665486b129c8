"""The model store: models saved as Parquet chunk tables, rebuilt and checked by sha256."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sql_magics.errors import ExecutionError
from udf_engine import (
    ModelError,
    UDFBuildInFunc,
    UnsafePathError,
    detect_format,
    materialize,
    model_meta,
    model_rows,
    read_model_rows,
    save_model,
)
from udf_engine.models.store import META_PATH, SCHEMA, _digest


def test_keras_file_round_trips_and_loads(keras_model, digits, tmp_path):
    model, path = keras_model
    table = save_model(path, tmp_path / "digits_table", version="7")

    assert pq.read_schema(next(table.glob("*.parquet"))).equals(SCHEMA, check_metadata=False)
    rows = read_model_rows(table)
    meta = model_meta(rows)
    assert (meta["format"], meta["version"], meta["files"]) == ("keras", "7", 1)
    restored = materialize(rows, tmp_path / "restored")
    assert restored.read_bytes() == path.read_bytes()

    loaded = UDFBuildInFunc.init_tf(rows, {})
    np.testing.assert_allclose(loaded.predict_on_batch(digits[0][:50]), model.predict(digits[0][:50], verbose=0), atol=1e-6)


def test_savedmodel_directory_round_trips_and_loads(keras_model, digits, tmp_path):
    model, _ = keras_model
    export_dir = tmp_path / "exported"
    model.export(export_dir, verbose=False)
    assert detect_format(export_dir) == "savedmodel"

    rows = read_model_rows(save_model(export_dir, tmp_path / "sm_table"))
    assert model_meta(rows)["files"] > 1
    restored = materialize(rows, tmp_path / "restored")
    originals = sorted(p.relative_to(export_dir) for p in export_dir.rglob("*") if p.is_file())
    assert sorted(p.relative_to(restored) for p in restored.rglob("*") if p.is_file()) == originals

    loaded = UDFBuildInFunc.init_tf(rows, {})
    np.testing.assert_allclose(loaded.predict(digits[0][:20]), model.predict(digits[0][:20], verbose=0), atol=1e-5)


def test_a_flipped_byte_fails_the_checksum(sklearn_model, tmp_path):
    _, path = sklearn_model
    rows = read_model_rows(save_model(path, tmp_path / "t"))
    chunk = next(r for r in rows if r["path"] == "")
    value = bytearray(chunk["value"])
    value[len(value) // 2] ^= 0x01
    chunk["value"] = bytes(value)

    with pytest.raises(ModelError, match="sha256 mismatch") as err:
        materialize(rows, tmp_path / "out")
    assert model_meta(rows)["sha256"] in str(err.value)


def test_missing_model_path_is_named(tmp_path):
    missing = tmp_path / "nope.keras"
    with pytest.raises(ModelError, match="nope.keras"):
        save_model(missing, tmp_path / "t")


def test_unknown_suffix_asks_for_a_format(tmp_path):
    weird = tmp_path / "model.bin"
    weird.write_bytes(b"x")
    with pytest.raises(ModelError, match="format"):
        detect_format(weird)


def _crafted(rows: list[dict], *, path: str | None = None, name: str | None = None) -> list[dict]:
    """Rows as a hostile author would write them: a file's path or the model's name changed, and the
    sha256 made again over the changed rows (the table's own digest proves integrity, not origin)."""
    rows = [dict(r) for r in rows]
    meta_row = next(r for r in rows if r["path"] == META_PATH)
    meta = json.loads(meta_row["value"])
    if path is not None:
        for row in rows:
            if row["path"] != META_PATH:
                row["path"] = path
    if name is not None:
        meta["name"] = name
    contents = {}
    for row in rows:
        if row["path"] != META_PATH:
            contents[row["path"]] = contents.get(row["path"], b"") + row["value"]
    meta["sha256"] = _digest(contents.items())
    meta_row["value"] = json.dumps(meta).encode()
    return rows


@pytest.mark.parametrize(
    ("directory", "change"),
    [
        (True, {"path": "../escaped.pth"}),
        (True, {"path": "sub/../../escaped.pth"}),
        (True, {"path": "/tmp/rayudf-test-absolute/escaped.pth"}),
        (False, {"name": "/tmp/rayudf-test-absolute/escaped.pth"}),
        (False, {"name": "../escaped.pth"}),
        (False, {"name": ".."}),
    ],
)
def test_a_crafted_model_table_writes_nothing_outside_its_directory(tmp_path, directory, change):
    src = tmp_path / "src"
    if directory:
        (src / "variables").mkdir(parents=True)
        (src / "saved_model.pb").write_bytes(b"graph")
        (src / "variables" / "v.index").write_bytes(b"weights")
    else:
        src.mkdir()
        (src / "m.pkl").write_bytes(b"pickle")
        src = src / "m.pkl"
    rows = _crafted(model_rows(src), **change)
    dest = tmp_path / "workers" / "model"
    with pytest.raises(UnsafePathError, match="refused, it would be written outside") as err:
        materialize(rows, dest)
    assert repr(next(iter(change.values()))) in str(err.value)  # names the entry
    written = [p for p in tmp_path.rglob("escaped.pth")] + list(Path("/tmp/rayudf-test-absolute").glob("*"))
    assert written == [] and not dest.exists()


def test_a_crafted_model_table_fails_register_naming_the_entry(session, sklearn_model, tmp_path):
    table = tmp_path / "evil_table"
    rows = _crafted(model_rows(sklearn_model[1]), name="../../evil.pth")
    table.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), table / "part-00000.parquet")
    with pytest.raises(ExecutionError, match=r"model table name '../../evil.pth': refused, it would be written outside"):
        session.sql(f'register model.`{table}` as evil where workers="1" and num_cpus="0.5"')
    assert "evil" not in session.functions
