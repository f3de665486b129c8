"""The notebooks in notebooks/ run top to bottom in a real Jupyter kernel that joins the test session's Ray.

Each notebook runs with its working directory set to a fresh temporary directory (its files
go to ``nb_data/`` there) and ``RAY_ADDRESS`` pointing at the shared Ray, so the kernel's
Session joins that cluster instead of starting its own.

The kernel is the interpreter running the tests: a ``python3`` kernelspec whose argv starts
with ``sys.executable`` is written to a temporary directory that ``JUPYTER_PATH`` puts first,
so a ``python3`` kernelspec installed elsewhere (a user's ~/.local/share/jupyter, another
virtualenv) can never make the notebooks run in an interpreter without rayudf.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from conftest import named_actors, write_kernelspec

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
# The model functions each notebook registers: their workers must be gone once the kernel ends.
FUNCTIONS = {
    "01_quickstart.ipynb": ["digit_predict"],
    "02_batch_scoring.ipynb": ["lr_predict"],
    "03_byzer_style.ipynb": ["clf_predict"],
    "04_byzer_python.ipynb": ["model_predict"],
    "05_streaming.ipynb": ["lr_stream"],
    "06_text_models.ipynb": ["topic", "embed"],
}


# Lines that only a worker process prints: TensorFlow's and absl's start-up, Ray's prefixes.
WORKER_NOISE = ("oneDNN", "absl::InitializeLog", "cpu_feature_guard", "(UDFWorker pid=", "(raylet)")


@pytest.fixture(scope="module")
def ray_address(ray_cluster):
    return ray_cluster.get_runtime_context().gcs_address


@pytest.fixture
def kernel_env(ray_address, tmp_path_factory, monkeypatch):
    """RAY_ADDRESS for the kernel, and a ``python3`` kernelspec that runs this interpreter."""
    jupyter_path = write_kernelspec(tmp_path_factory.mktemp("jupyter"))
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    monkeypatch.setenv("RAY_ADDRESS", ray_address)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")


def run_notebook(path: Path, cwd: Path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    started = time.perf_counter()
    try:
        client.execute()
    finally:
        nbformat.write(nb, cwd / f"executed_{path.name}")  # kept by pytest in its tmp dirs, for a look after a failure
    return nb, time.perf_counter() - started


def outputs(nb):
    for cell in nb.cells:
        if cell.cell_type == "code":
            for output in cell.get("outputs", []):
                yield cell, output


def output_text(output) -> str:
    """The text of a stream, or every text-like representation of a display/result."""
    if output.output_type == "stream":
        return output.text
    data = output.get("data", {})
    return "\n".join(str(value) for key, value in data.items() if key.startswith("text/") or key.endswith("json"))


def cell_output_text(nb, source_part: str) -> str:
    cells = [c for c in nb.cells if c.cell_type == "code" and source_part in c.source]
    assert len(cells) == 1, f"expected one cell containing {source_part!r}"
    return "\n".join(output_text(o) for o in cells[0].get("outputs", []))


def widget_text(nb) -> str:
    """The final state of the notebook's widgets (the progress bar is a tqdm widget in a kernel)."""
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    texts = [str(model["state"].get("value", "")) for model in state.get("state", {}).values()]
    return "\n".join(texts).replace("\u2007", " ")  # tqdm's widget pads with figure spaces


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_notebook_runs_top_to_bottom(name, kernel_env, tmp_path):
    nb, elapsed = run_notebook(NOTEBOOKS / name, tmp_path)
    print(f"{name}: {elapsed:.1f} s")

    errors = [
        f"cell {cell.source[:60]!r}: {out.get('ename')}: {out.get('evalue')}"
        for cell, out in outputs(nb) if out.output_type == "error"
    ]
    assert not errors, errors
    tracebacks = [
        f"cell {cell.source[:60]!r}: {out.text[-800:]}"
        for cell, out in outputs(nb)
        if out.output_type == "stream" and out.name == "stderr" and "Traceback" in out.text
    ]
    assert not tracebacks, tracebacks
    # The workers' TensorFlow/absl start-up lines and Ray's notices stay in the workers' logs.
    noise = [
        f"cell {cell.source[:60]!r}: {line}"
        for cell, out in outputs(nb)
        for line in output_text(out).splitlines()
        if any(mark in line for mark in WORKER_NOISE)
    ]
    assert not noise, noise

    if name.startswith("01"):
        assert any("image/png" in out.get("data", {}) for _, out in outputs(nb)), "no plot"
        accuracy_cell = next(c for c in nb.cells if c.source.startswith("%sql select held_out, count(*) as images"))
        html = "".join(out.get("data", {}).get("text/html", "") for out in accuracy_cell.outputs)
        assert "<table" in html and "accuracy" in html, "the accuracy query showed no HTML table"
        assert "accuracy on 450 held-out images" in cell_output_text(nb, "assert accuracy > 0.9")
        assert "digit_predict" in cell_output_text(nb, "%sql !workers")
    elif name.startswith("02"):
        progress = widget_text(nb) + "\n" + "\n".join(output_text(out) for _, out in outputs(nb))
        scored = [int(n.replace(",", "")) for n in re.findall(r"([\d,]+) rows scored", progress)]
        assert any(n > 0 for n in scored), f"no progress bar counted rows while scoring: {scored}"
        assert "row count check passed: 1,000,000 rows" in cell_output_text(nb, "row count check passed")
        assert any("image/png" in out.get("data", {}) for _, out in outputs(nb)), "no plot"
    elif name.startswith("03"):
        assert "predictions match the in-process model on 100 rows" in cell_output_text(nb, "assert_array_equal")
    elif name.startswith("04"):
        assert "table mnist_model created" in cell_output_text(nb, "#%python")
        assert "match the model run in-process on 100 rows" in cell_output_text(nb, "assert_array_equal")
        assert "WRITE" in cell_output_text(nb, "!delta info")  # the lake's history of the model table
    elif name.startswith("06"):
        held_out = re.search(r"accuracy on (\d+) held-out lines: ([\d.]+)", cell_output_text(nb, "assert accuracy > "))
        assert held_out and int(held_out[1]) > 200 and float(held_out[2]) > 0.7, held_out
        assert "the SQL answers match the model in-process on" in cell_output_text(nb, "assert_allclose")
        said = cell_output_text(nb, "nearest neighbour from the same module")
        same = re.search(r"nearest neighbour from the same module for (\d+)%", said)
        assert same and int(same[1]) > 40, same  # four modules: a guess is 25%
        assert "cpu" in cell_output_text(nb, "%sql !workers")
    else:
        assert "stream arrivals started" in cell_output_text(nb, "set streamName")  # the cell returned, the stream runs on
        assert "arrivals" in cell_output_text(nb, "%sql !streams")
        assert "exactly once: 3,000 rows, each scored as the model does in-process" in cell_output_text(nb, "exactly once")

    # Shutting the kernel down (or %sql --close) stops the notebook's workers.
    deadline = time.monotonic() + 20
    while (leaked := [n for n in named_actors("rayudf.", timeout_s=0) if any(f".{f}." in n for f in FUNCTIONS[name])]):
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not leaked, f"workers left running after the kernel ended: {leaked}"
