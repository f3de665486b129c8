"""pyjava's streaming_tar: a model directory or file as tar chunk rows, and back, safely."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from udf_engine import ModelError, UDFBuildInFunc
from udf_engine.models.store import CHUNK_BYTES, model_meta
from udf_engine.models.streaming_tar import build_rows_from_file, member_names, save_rows_as_file


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_directory_round_trip_in_any_row_order(tmp_path):
    src = tmp_path / "model"
    (src / "variables").mkdir(parents=True)
    (src / "assets").mkdir()
    (src / "saved_model.pb").write_bytes(b"graph")
    big = np.random.default_rng(0).bytes(CHUNK_BYTES + 12345)  # spans two chunks
    (src / "variables" / "variables.data-00000-of-00001").write_bytes(big)
    rows = list(build_rows_from_file(src))
    assert [sorted(r) for r in rows] == [["offset", "start", "value"]] * len(rows)
    assert len(rows) >= 2 and all(r["offset"] == len(r["value"]) for r in rows)
    assert [r["start"] for r in rows] == [sum(len(r["value"]) for r in rows[:i]) for i in range(len(rows))]

    out = save_rows_as_file(rows[::-1], tmp_path / "restored")  # a table read back may come in any order
    assert _tree(out) == _tree(src) and (out / "assets").is_dir()
    assert model_meta(rows)["format"] == "savedmodel"


def test_single_keras_file_round_trip_loads_with_init_tf(keras_model):
    model, path = keras_model
    rows = list(build_rows_from_file(path))
    assert member_names(rows) == [path.name] and model_meta(rows)["format"] == "keras"
    loaded = UDFBuildInFunc.init_tf(rows, {})
    x = np.random.default_rng(1).random((5, 64), dtype=np.float32)
    np.testing.assert_allclose(UDFBuildInFunc.predict(loaded, x), model.predict(x, verbose=0), atol=1e-6)


def _tar_rows(members: list[tuple[tarfile.TarInfo, bytes]]) -> list[dict]:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    return [{"start": 0, "offset": len(data), "value": data}]


@pytest.mark.parametrize("name", ["../escape.txt", "a/../../escape.txt", "/tmp/absolute.txt"])
def test_entries_outside_the_target_are_refused(tmp_path, name):
    rows = _tar_rows([(tarfile.TarInfo("ok.txt"), b"ok"), (tarfile.TarInfo(name), b"evil")])
    with pytest.raises(ModelError, match=r"tar entry '.*': refused, it would be written outside"):
        save_rows_as_file(rows, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_links_are_refused(tmp_path):
    link = tarfile.TarInfo("link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(ModelError, match="only files and directories"):
        save_rows_as_file(_tar_rows([(link, b"")]), tmp_path / "out")


def test_a_sparse_entry_is_refused(tmp_path):
    """A GNU sparse entry: a few bytes in the stream that unpack to a file of any size."""
    sparse = tarfile.TarInfo("model.bin")
    sparse.type = tarfile.GNUTYPE_SPARSE
    sparse.sparse = [(0, 0)]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(sparse, io.BytesIO(b""))
    rows = [{"start": 0, "offset": len(buffer.getvalue()), "value": buffer.getvalue()}]
    with pytest.raises(ModelError, match="only files and directories"):
        save_rows_as_file(rows, tmp_path / "out")
    assert not (tmp_path / "out" / "model.bin").exists()


def test_a_missing_or_repeated_chunk_is_named(tmp_path, keras_model):
    rows = list(build_rows_from_file(keras_model[1]))
    assert len(rows) >= 1
    doubled = [*rows, rows[0]]
    with pytest.raises(ModelError, match="do not join up"):
        save_rows_as_file(doubled, tmp_path / "out")
    rows = [dict(r) for r in rows]
    rows[0]["start"] = 7  # the first bytes lost
    with pytest.raises(ModelError, match="starts at byte 7, expected 0"):
        save_rows_as_file(rows, tmp_path / "out2")


def test_format_of_chunk_rows_is_read_as_of_the_files(tmp_path):
    mlflow_dir = tmp_path / "exported" / "churn"
    mlflow_dir.mkdir(parents=True)
    (mlflow_dir / "MLmodel").write_text("flavors: {}")
    (mlflow_dir / "model.pkl").write_bytes(b"x")
    assert model_meta(list(build_rows_from_file(mlflow_dir)))["format"] == "mlflow"  # entries at the top
    assert model_meta(list(build_rows_from_file(tmp_path / "exported")))["format"] == "mlflow"  # one directory inside
    with pytest.raises(ModelError, match="cannot tell the model format"):
        model_meta(list(build_rows_from_file(tmp_path)))  # two levels down: not a model
