"""The quick-start notebook, run as a person would: in JupyterLab, in a real (headless) Chromium.

JupyterLab is started on loopback with a fixed token, in a temp dir holding a copy of
``notebooks/01_quickstart.ipynb``; its kernel joins the test session's Ray (``RAY_ADDRESS``).
Playwright opens the notebook, clicks Run > Run All Cells and waits until the page shows the
scored HTML table and the confusion-matrix plot, with no error in any output; File > Save
Notebook then lets the saved outputs be checked for errors too. A screenshot of the whole
notebook is written to ``tests/artifacts/jupyterlab_quickstart.png`` (git-ignored). Teardown
shuts the kernel and the server down and checks the kernel's Ray workers are gone.

Chromium is Debian's ``/usr/bin/chromium`` (``make test`` installs it when run as root);
Playwright never downloads a browser of its own. Without Chromium the test is skipped.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import pytest

from conftest import write_kernelspec

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "01_quickstart.ipynb"
ARTIFACTS = ROOT / "tests" / "artifacts"
SCREENSHOT = ARTIFACTS / "jupyterlab_quickstart.png"
CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "rayudf-browser-test"

# Debian's Chromium on a closed network: no sandbox as root, and none of its background
# connections (they are refused here, many at a time).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SERVER_START_S = 90
RUN_ALL_S = 240  # train, register 1-2 Ray workers, score, plot: well under a minute when idle

# JupyterLab user settings for the run: no news/update checks (no network), and every cell kept
# in the DOM (no windowing), so the outputs can be found wherever they are on the page.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}

OUTPUT = ".jp-OutputArea-output"
STDERR = '.jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]'
ERROR_TEXT = re.compile(r"Traceback|\b[A-Za-z]*(Error|Exception)\b:")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """A JupyterLab server process, and its REST API."""

    def __init__(self, root: Path, ray_address: str, home: Path):
        self.root = root
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = home / "jupyterlab.log"
        settings = home / "lab-settings"
        for name, values in LAB_SETTINGS.items():
            path = settings / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        # The kernel is this interpreter: a python3 kernelspec first on JUPYTER_PATH, so one
        # installed elsewhere (~/.local/share/jupyter, another venv) is never picked instead.
        write_kernelspec(home / "jupyter-path")
        env = dict(os.environ)
        env.update(
            JUPYTER_PATH=str(home / "jupyter-path"),
            RAY_ADDRESS=ray_address,
            TF_CPP_MIN_LOG_LEVEL="2",
            PYTHONUNBUFFERED="1",
            # Nothing read from or written to the user's own Jupyter dirs.
            JUPYTER_CONFIG_DIR=str(home / "config"),
            JUPYTER_RUNTIME_DIR=str(home / "runtime"),
            JUPYTERLAB_SETTINGS_DIR=str(settings),
            JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
        )
        env.pop("JUPYTER_PLATFORM_DIRS", None)
        cmd = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={TOKEN}",
            f"--ServerApp.root_dir={root}",
            "--LabApp.news_url=",
        ]
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def api(self, method: str, path: str, timeout: float = 10.0):
        request = urllib.request.Request(
            f"{self.base}{path}", method=method, headers={"Authorization": f"token {TOKEN}"}, data=b"" if method == "POST" else None
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def wait_ready(self, timeout_s: float = SERVER_START_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.api("GET", "/api/status", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise RuntimeError(f"jupyter lab did not answer on {self.base} within {timeout_s} s:\n{self.log_tail()}")

    def wait_kernel_idle(self, path: str, timeout_s: float = 90) -> None:
        """Until the server has a session for ``path`` whose kernel is idle."""
        deadline = time.monotonic() + timeout_s
        while True:
            states = [s["kernel"]["execution_state"] for s in self.api("GET", "/api/sessions") if s["path"] == path]
            if states == ["idle"]:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"no idle kernel for {path} after {timeout_s} s: {states}\n{self.log_tail()}")
            time.sleep(0.25)

    def stop(self) -> None:
        """Shut the kernels down, then the server; kill whatever of its process tree is left."""
        import psutil

        try:
            tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        if self.proc.poll() is None:
            try:
                for kernel in self.api("GET", "/api/kernels"):
                    self.api("DELETE", f"/api/kernels/{kernel['id']}", timeout=30)
                self.api("POST", "/api/shutdown")
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        _, alive = psutil.wait_procs(tree, timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        self._log.close()


@pytest.fixture(scope="session")  # session scope: checked before the session's Ray starts
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.skip(
            f"Chromium not found at {CHROMIUM}: install Debian's chromium (`make chromium` as root, "
            "or `apt-get install chromium`) to run the JupyterLab browser test"
        )
    return CHROMIUM


def _named_actors(ray) -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}


@pytest.fixture
def lab(chromium, ray_cluster, tmp_path):
    """JupyterLab serving a copy of the notebook; on the way out, its kernel's Ray workers are gone."""
    assert NOTEBOOK.exists(), f"{NOTEBOOK.relative_to(ROOT)} is missing"
    root = tmp_path / "work"
    root.mkdir()
    # A fresh run: no outputs or execution counts saved in the file may pass for this run's.
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, root / NOTEBOOK.name)
    actors_before = _named_actors(ray_cluster)
    server = JupyterLab(root, ray_cluster.get_runtime_context().gcs_address, tmp_path)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
    deadline = time.monotonic() + 30
    while (left := _named_actors(ray_cluster) - actors_before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"Ray actors the notebook's kernel left behind: {sorted(left)}"


def _visible_errors(page) -> list[str]:
    """Text of the error outputs on the page: tracebacks and ``...Error:`` lines on stderr."""
    texts = page.locator(f"{OUTPUT} {STDERR}, {OUTPUT}{STDERR}").all_inner_texts()
    return [text.strip()[-1500:] for text in texts if ERROR_TEXT.search(text)]


def _cells_state(page) -> dict:
    """What the notebook shows now: its cells, how many ran, which still run, and the outputs."""
    return page.evaluate(
        """() => {
            const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]
                .map(e => e.textContent.trim());
            return {
                cells: prompts.length,
                ran: prompts.filter(p => /^\\[\\d+\\]:$/.test(p)).length,
                running: prompts.filter(p => p === '[*]:').length,
                tables: document.querySelectorAll('.jp-OutputArea-output table').length,
                scored: [...document.querySelectorAll('.jp-OutputArea-output table')].filter(
                    t => [...t.querySelectorAll('th')].some(th => th.textContent.trim() === 'predicted')).length,
                plots: document.querySelectorAll(
                    '.jp-OutputArea-output img[src^="data:image/png"]').length,
                kernel: document.querySelector('.jp-Notebook-ExecutionIndicator')?.getAttribute('data-status'),
                dialog: [...document.querySelectorAll('.jp-Dialog')].map(d => d.innerText.trim()).join('\\n'),
            };
        }"""
    )


def _notebook_height(page) -> float:
    """Scroll the notebook to its top; return the page height that shows it down to its last cell."""
    return page.evaluate(
        """() => {
            const scroller = document.querySelector('.jp-NotebookPanel .jp-WindowedPanel-outer')
                || document.querySelector('.jp-NotebookPanel-notebook');
            scroller.scrollTop = 0;
            const cells = document.querySelectorAll('.jp-NotebookPanel .jp-Cell');
            const bottom = cells[cells.length - 1].getBoundingClientRect().bottom;
            const statusbar = document.querySelector('#jp-main-statusbar');
            return bottom + 40 + (statusbar ? statusbar.getBoundingClientRect().height : 0);
        }"""
    )


def _wait_saved(path: Path, timeout_s: float = 30):
    """The notebook as JupyterLab saved it, once it holds this run's outputs."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            nb = nbformat.read(path, as_version=4)
        except nbformat.reader.NotJSONError:  # caught between JupyterLab's truncate and its write
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
            continue
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        if all(cell.execution_count for cell in code) or time.monotonic() > deadline:
            return nb
        time.sleep(0.5)


def test_quickstart_notebook_runs_in_jupyterlab(lab):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    url = f"{lab.base}/lab/tree/{NOTEBOOK.name}?token={TOKEN}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            console_errors: list[str] = []
            page.on("pageerror", lambda err: console_errors.append(str(err)))
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)

            # The notebook is open and its kernel is up.
            page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(state="visible", timeout=90_000)
            # (The indicator also says 'idle' for a moment before the kernel is chosen: Run All then
            # asks to select a kernel. So: a named kernel, idle on the page and on the server.)
            page.wait_for_function(
                """() => {
                    const name = document.querySelector('.jp-NotebookPanel-toolbar .jp-KernelName')?.innerText.trim();
                    const status = document.querySelector('.jp-Notebook-ExecutionIndicator')?.getAttribute('data-status');
                    return name && name !== 'No Kernel' && status === 'idle';
                }""",
                timeout=90_000,
            )
            lab.wait_kernel_idle(NOTEBOOK.name)
            state = _cells_state(page)
            assert state["cells"] > 0, state

            # Run > Run All Cells, from the menu bar.
            page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
            page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()

            # Poll until every code cell has run and the kernel is idle again, or an error shows.
            deadline = time.monotonic() + RUN_ALL_S
            while True:
                time.sleep(1.0)
                state = _cells_state(page)
                errors = _visible_errors(page)
                finished = state["ran"] == state["cells"] and state["running"] == 0 and state["kernel"] == "idle"
                if errors or finished or state["dialog"] or state["kernel"] == "dead" or time.monotonic() > deadline:
                    break

            # File > Save Notebook: the outputs the kernel sent, as saved, are checked below too.
            saved = None
            if finished and not state["dialog"]:
                page.locator(".lm-MenuBar-item", has_text=re.compile(r"^File$")).click()
                page.get_by_role("menuitem", name=re.compile(r"^Save Notebook(?! As)")).click()
                saved = _wait_saved(lab.root / NOTEBOOK.name)

            # The whole notebook in one picture: left sidebar closed, the window as tall as the notebook.
            if not state["dialog"]:
                page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current").first.click()
            page.set_viewport_size({"width": 1400, "height": int(min(max(1000, _notebook_height(page)), 8000))})
            _notebook_height(page)  # scrolls to the top again after the resize
            page.wait_for_timeout(1000)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()

    assert not errors, "the notebook showed an error:\n\n" + "\n\n".join(errors)
    assert not state["dialog"], f"JupyterLab showed a dialog during the run: {state['dialog']!r} (see {SCREENSHOT})"
    assert finished, f"the notebook had not finished after {RUN_ALL_S} s: {state} (see {SCREENSHOT})"
    assert state["tables"] >= 1, f"no HTML table in any output: {state} (see {SCREENSHOT})"
    assert state["scored"] >= 1, f"no table with a 'predicted' column (the scored rows): {state} (see {SCREENSHOT})"
    assert state["plots"] >= 1, f"no PNG plot in any output: {state} (see {SCREENSHOT})"
    error_outputs = [
        f"{out.get('ename')}: {out.get('evalue')}" for cell in saved.cells for out in cell.get("outputs", []) if out.output_type == "error"
    ]
    assert not error_outputs, f"error outputs in the saved notebook: {error_outputs}"
    assert not console_errors, f"JupyterLab raised in the page: {console_errors}"
