"""The model store: models saved as Parquet chunk tables, rebuilt and checked by sha256."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from udf_engine import ModelError, UDFBuildInFunc, detect_format, materialize, model_meta, read_model_rows, save_model
from udf_engine.models.store import SCHEMA


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
