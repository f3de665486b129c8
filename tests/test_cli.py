"""The rayudf command line, run as a real subprocess that joins the test session's Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from udf_engine import save_model

ROOT = Path(__file__).resolve().parents[1]
RAYUDF = str(Path(sys.executable).with_name("rayudf"))


@pytest.fixture(scope="module")
def ray_address(ray_cluster):
    return ray_cluster.get_runtime_context().gcs_address


def rayudf(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAYUDF, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )


def test_digits_example_scores_and_saves(ray_address, keras_model, digits, digits_parquet, tmp_path):
    model, path = keras_model
    out = tmp_path / "scored.parquet"
    done = rayudf(
        "run", "examples/digits_score.sql", "--ray-address", ray_address,
        "--set", f"data={digits_parquet}", "--set", f"model={path}", "--set", f"out={out}", "--set", "workers=1",
    )
    assert done.returncode == 0, done.stderr
    scored = pd.read_parquet(out).sort_values("id")
    expected = model.predict(digits[0], verbose=0).argmax(axis=1)
    np.testing.assert_array_equal(scored["predicted"].to_numpy(), expected)
    accuracy = float((expected == digits[1]).mean())
    assert "accuracy" in done.stdout and f"{accuracy:.6f}"[:5] in done.stdout


def test_byzer_example_runs_unchanged(ray_address, keras_model, digits, digits_parquet, tmp_path):
    model, path = keras_model
    table = save_model(path, tmp_path / "clf_table")
    done = rayudf(
        "run", "examples/byzer_register_ray.sql", "--ray-address", ray_address, "--limit", "0",
        "--set", f"model_table={table}", "--set", f"data={digits_parquet}", "--set", "workers=1",
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].split() == ["id", "label", "predicted"] and len(lines) == 101
    first = lines[1].split(maxsplit=2)
    assert first[0] == "0" and float(first[2].strip("[]")) == model.predict(digits[0][:1], verbose=0).argmax()


def test_byzer_train_to_score_example_runs_unchanged(ray_address, tmp_path):
    from deltalake import DeltaTable

    from sql_magics.front.demo import write_mnist_like

    mnist = write_mnist_like(tmp_path / "mnist")
    done = rayudf(
        "run", "examples/byzer_train_to_score.sql", "--ray-address", ray_address, "--limit", "0",
        "--set", f"mnist={mnist}", "--set", f"lake.root={tmp_path / 'lake'}",
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].split() == ["predicted", "label"] and len(lines) == 101
    correct = sum(float(line.split("]]")[0].strip(" [")) == int(line.split("]]")[1]) for line in lines[1:])
    assert correct >= 50  # far above chance (10)
    assert DeltaTable(str(tmp_path / "lake" / "ai_model" / "mnist_model")).version() == 0


def test_connect_joins_the_cluster_its_url_names_when_the_session_has_no_ray(ray_address, tmp_path):
    script = tmp_path / "join.sql"
    script.write_text(f"""run command as Ray.`` where outputTable="joined" and code='''
import ray
from pyjava.api.mlsql import RayContext
RayContext.connect(globals(), "{ray_address}")
context.build_result([{{"gcs": ray.get_runtime_context().gcs_address}}])
''';
select gcs from joined as output;""")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([RAYUDF, "run", str(script)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == ray_address  # joined the named cluster instead of starting one


def test_parse_error_exits_2_with_one_line_and_runs_nothing(tmp_path):
    script = tmp_path / "bad.sql"
    target = tmp_path / "made.csv"
    script.write_text(f"copy (select 1) to '{target}';\nload csv.`x` ass t;\n")
    done = rayudf("run", str(script))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {script}: line 2, col 14: load: expected 'as <table>' after the path, found 'ass'"]
    assert "Traceback" not in done.stderr and not target.exists()


def test_execution_error_exits_1_naming_the_line(tmp_path):
    script = tmp_path / "fails.sql"
    script.write_text("select 1 as a from range(1);\n\nselect * from missing_table;\n")
    done = rayudf("run", str(script))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {script}: line 3: ") and "missing_table" in lines[0]

    debug = rayudf("run", str(script), "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_set_wins_over_the_script_and_limit_cuts_rows(tmp_path):
    script = tmp_path / "vars.sql"
    script.write_text('set n = "3";\nselect range as i from range(${n}) as output;\n')
    done = rayudf("run", str(script), "--set", "n=30", "--limit", "5")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "... 30 rows, 5 shown"
    bad = rayudf("run", str(script), "--set", "novalue")
    assert bad.returncode == 2 and "expected key=value" in bad.stderr


def test_a_script_ending_in_a_named_select_says_what_it_made(tmp_path):
    script = tmp_path / "view.sql"
    script.write_text("select 42 as answer;\n")
    done = rayudf("run", str(script))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "view answer created: 1 column; end with 'as output' to see rows"


def test_missing_script_is_a_usage_error(tmp_path):
    done = rayudf("run", str(tmp_path / "nope.sql"))
    assert done.returncode == 2 and "nope.sql" in done.stderr and "Traceback" not in done.stderr


def test_demo_command(ray_address, tmp_path):
    done = rayudf("demo", "--workdir", str(tmp_path / "demo"), "--output", str(tmp_path / "out.parquet"), env={"RAY_ADDRESS": ray_address})
    assert done.returncode == 0, done.stderr
    assert "accuracy" in done.stdout and "rows/s" in done.stdout
    scored = pd.read_parquet(tmp_path / "out.parquet")
    held_out = scored[scored["held_out"]]
    accuracy = (held_out["predicted"] == held_out["label"]).mean()
    assert len(scored) == 1797 and len(held_out) == 450 and accuracy > 0.9
    assert f"accuracy {accuracy:.3f} on the 450 held-out images" in done.stdout


def test_stream_example_scores_files_dropped_in_until_sigterm_then_exits_0(ray_address, keras_model, digits, tmp_path):
    import signal
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    model, path = keras_model
    pixels, _ = digits
    incoming, scored = tmp_path / "incoming", tmp_path / "scored"
    incoming.mkdir()
    stream = subprocess.Popen(
        [
            RAYUDF, "run", "examples/stream_scores.sql", "--ray-address", ray_address, "--set", f"incoming={incoming}",
            "--set", f"scored={scored}", "--set", f"checkpoint={tmp_path / 'ck'}", "--set", f"model={path}", "--set", "workers=1",
        ],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        for name, (low, high) in {"a.parquet": (0, 300), "b.parquet": (300, 700)}.items():
            rows = pa.table({
                "id": pa.array(np.arange(low, high), pa.int64()),
                "pixels": pa.FixedSizeListArray.from_arrays(pa.array(pixels[low:high].ravel()), pixels.shape[1]),
            })
            pq.write_table(rows, incoming / f".{name}")
            os.replace(incoming / f".{name}", incoming / name)  # whole, by rename
        deadline = time.monotonic() + 240
        while sum(pq.ParquetFile(p).metadata.num_rows for p in scored.glob("*.parquet")) < 700:
            assert stream.poll() is None and time.monotonic() < deadline, stream.stderr.read() if stream.poll() is not None else "timed out"
            time.sleep(0.2)
        stream.send_signal(signal.SIGTERM)
        out, err = stream.communicate(timeout=120)
    finally:
        if stream.poll() is None:
            stream.kill()
    assert stream.returncode == 0, err
    assert "stream digit_scores started" in out and "stream digit_scores: batch 0 committed" in out
    assert "stopping: each stream commits its batch in progress" in err
    written = pd.read_parquet(scored).sort_values("id")
    assert written["id"].tolist() == list(range(700))
    np.testing.assert_array_equal(written["predicted"].to_numpy(), model.predict(pixels[:700], verbose=0).argmax(axis=1))


def test_a_stream_that_fails_exits_1_naming_the_bad_file(tmp_path):
    incoming = tmp_path / "in"
    incoming.mkdir()
    (incoming / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    script = tmp_path / "stream.sql"
    script.write_text(f"""set streamName="breaks";
load parquet.`{incoming}` as events;
select * from events as copied;
save append copied as parquet.`{tmp_path / 'out'}` options duration="0" and checkpointLocation="{tmp_path / 'ck'}";
""")
    done = rayudf("run", str(script))
    assert done.returncode == 1, done.stderr
    assert "stream breaks started" in done.stdout
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: stream breaks: bad file {incoming / 'broken.parquet'}: ")
    assert not (tmp_path / "out").exists()
