"""The demo job behind ``make demo`` / ``rayudf demo``: train, save, register, score through SQL.

Uses scikit-learn's digits (1,797 real 8x8 images that ship inside the package),
so nothing is downloaded. A quarter of the images is held out of training; the
accuracy reported is on those.

Example:
    >>> summary = run_demo("demo_data", "out/scored.parquet")   # doctest: +SKIP
    >>> summary["accuracy"] > 0.9                                # doctest: +SKIP
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from arrow_bridge.quoting import quote_literal
from sql_magics.session import Session
from udf_engine.models.store import save_model

# The share of the digits kept out of training, to measure accuracy on images the model never saw.
HELD_OUT_SHARE = 0.25
# Rows per Parquet row group: several groups, so DuckDB reads (and scores) on several threads.
ROW_GROUP_ROWS = 256
# 8x8 digits scaled 3x are 24x24; 2 pixels of border on each side make MNIST's 28x28.
MNIST_PAD = 2


def digits_table() -> tuple[pa.Table, np.ndarray]:
    """The digits as an Arrow table (id, pixels FLOAT[64] scaled to 0..1, label, held_out) and the pixels.

    ``held_out`` marks a stratified quarter of the images that training never sees.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (digits.data / 16.0).astype(np.float32)
    ids = np.arange(len(pixels))
    _, held_out_ids = train_test_split(ids, test_size=HELD_OUT_SHARE, stratify=digits.target, random_state=0)
    table = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "pixels": pa.FixedSizeListArray.from_arrays(pa.array(pixels.ravel()), 64),
            "label": pa.array(digits.target, pa.int64()),
            "held_out": pa.array(np.isin(ids, held_out_ids)),
        }
    )
    return table, pixels


def mnist_like_table() -> pa.Table:
    """The digits drawn MNIST-sized: ``image`` DOUBLE[784] (28x28, 0..1) and ``label``.

    Each 8x8 image is scaled up 3x and padded by 2 pixels, so Byzer's MNIST scripts
    (``reshape((n, 28*28))``) run unchanged on data that ships with scikit-learn.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.kron(digits.images / 16.0, np.ones((3, 3)))
    images = np.pad(images, ((0, 0), (MNIST_PAD, MNIST_PAD), (MNIST_PAD, MNIST_PAD)))
    return pa.table(
        {
            "image": pa.array(list(images.reshape(len(images), -1)), pa.list_(pa.float64())),
            "label": pa.array(digits.target, pa.int64()),
        }
    )


def write_mnist_like(directory: str | Path) -> Path:
    """Write :func:`mnist_like_table` as a Parquet directory (``load parquet.`<directory>```)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pq.write_table(mnist_like_table(), directory / "part-0.parquet", row_group_size=ROW_GROUP_ROWS)
    return directory


def train_digits_model(pixels: np.ndarray, labels: np.ndarray, path: Path, epochs: int = 30) -> Path:
    """Train a small Keras classifier (64 -> 32 -> 10, softmax) and save it as ``.keras``."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10, activation="softmax")]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(pixels, labels, epochs=epochs, batch_size=64, verbose=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path


def run_demo(workdir: str | Path = "demo_data", output: str | Path = "out/scored.parquet", *, echo: Callable[[str], None] = print) -> dict:
    """Build the demo model and table, score the table through SQL on 2 Ray workers, write the result."""
    workdir, output = Path(workdir), Path(output)
    table, pixels = digits_table()
    data_path = workdir / "data" / "digits.parquet"
    data_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, data_path, row_group_size=ROW_GROUP_ROWS)
    echo(f"wrote {table.num_rows} digit images to {data_path}")
    mnist_path = write_mnist_like(workdir / "data" / "mnist")
    echo(f"wrote them MNIST-sized (28x28) to {mnist_path}, for examples/byzer_train_to_score.sql")

    started = time.perf_counter()
    train = ~table["held_out"].to_numpy()
    model_path = train_digits_model(pixels[train], table["label"].to_numpy()[train], workdir / "models" / "digits.keras")
    model_table = save_model(model_path, workdir / "models" / "digits_table")
    echo(f"trained {model_path} in {time.perf_counter() - started:.1f} s; saved as model table {model_table}")

    output.parent.mkdir(parents=True, exist_ok=True)
    with Session() as session:
        started = time.perf_counter()
        session.register_model("digit_predict", model_table, workers=2, batch_size=256)
        register_s = time.perf_counter() - started
        echo(f"registered digit_predict on 2 Ray workers in {register_s:.1f} s")
        started = time.perf_counter()
        session.sql(
            f"""
            COPY (
                SELECT id, label, held_out, probs,
                       list_position(probs::FLOAT[], list_max(probs::FLOAT[])) - 1 AS predicted
                FROM (SELECT id, label, held_out, digit_predict(pixels) AS probs FROM read_parquet({quote_literal(str(data_path))}))
                ORDER BY id
            ) TO {quote_literal(str(output))} (FORMAT parquet)
            """
        )
        score_s = time.perf_counter() - started
        summary = session.sql(
            f"""SELECT count(*) AS rows, count(*) FILTER (held_out) AS held_out,
                       avg((predicted = label)::INT) FILTER (held_out) AS accuracy
                FROM read_parquet({quote_literal(str(output))})"""
        ).iloc[0]
        workers = session.functions["digit_predict"].udf.stats()
    rows = int(summary["rows"])
    result = {
        "rows": rows,
        "accuracy": float(summary["accuracy"]),  # on the held-out rows
        "held_out": int(summary["held_out"]),
        "rows_per_s": rows / score_s,
        "register_s": register_s,
        "output": str(output),
        "rows_per_worker": [w["rows"] for w in workers],
    }
    echo(
        f"scored {rows} rows through SQL in {score_s:.2f} s ({result['rows_per_s']:,.0f} rows/s), "
        f"rows per worker {result['rows_per_worker']}"
    )
    echo(f"accuracy {result['accuracy']:.3f} on the {result['held_out']} held-out images (not used in training)")
    echo(f"result written to {output}")
    return result
