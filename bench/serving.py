"""``python -m bench.serving``: rayudf serve against a plain Ray Serve deployment and a bare uvicorn app.

The same model answers ``POST {"inputs": [[...], ...]}`` in three ways:
- **rayudf**: ``Session.serve``, the model in UDFWorker actors (2 workers), requests coalesced by the replica;
- **the peer**: a Ray Serve deployment written as Ray's docs show (``@serve.deployment`` with a
  ``@serve.batch`` method, the model loaded in the replica), with the same batch options;
- **the limit**: the model in-process behind a bare uvicorn app (no Ray, no coalescing).

Load comes from this process, on loopback, bounded in requests: latency at concurrency 1, and
rows/s at concurrency 32 for 1-row and 1,000-row requests; the mean number of requests each call
to the model took. The contenders take turns (rounds interleaved); the report quotes medians. Each
ingress mode of Serve (``--ingress``: HAProxy, Serve's own proxy) runs on a Ray of its own.

Example:
    $ python -m bench.serving --rounds 1 --requests 100       # a quick look
    $ make bench                                               # with the rest of the benchmark
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from bench.data import build_model, start_ray
from sql_magics.serving.ingress import INGRESS_MODES, INGRESS_VARIABLE

# The coalescing options every contender that coalesces gets (rayudf's defaults).
MAX_BATCH_SIZE = 32
BATCH_WAIT_S = 0.005
CONCURRENCY = 32


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each contender and measure")
    p.add_argument("--requests", type=int, default=400, help="requests of a latency run (concurrency 1)")
    p.add_argument("--load-requests", type=int, default=1000, help="1-row requests of a run at concurrency 32")
    p.add_argument("--bulk-requests", type=int, default=64, help="1,000-row requests of a run at concurrency 32")
    p.add_argument("--models", default="xgboost,keras", help="which models: xgboost, keras or both")
    p.add_argument("--ingress", default="haproxy,proxy", help="Serve's ingress: haproxy (HAProxy, high-throughput mode), proxy, or both")
    p.add_argument("--workdir", type=Path, default=Path("bench_data"), help="where the models go")
    p.add_argument("--out", type=Path, default=Path("bench/SERVING.md"), help="the report")
    return p.parse_args(argv)


# -- the models ------------------------------------------------------------------------------


def build_booster(path: Path, columns: int = 16) -> Path:
    """A cheap model: an XGBoost regressor on ``columns`` random columns, saved as its own .ubj."""
    if path.exists():
        return path
    import xgboost

    rng = np.random.default_rng(0)
    x = rng.random((5000, columns), dtype=np.float32)
    y = x @ rng.random(columns) + rng.normal(0, 0.1, 5000)
    booster = xgboost.train({"max_depth": 6, "nthread": 1}, xgboost.DMatrix(x, y), num_boost_round=100)
    path.parent.mkdir(parents=True, exist_ok=True)
    booster.save_model(path)
    return path


class LocalModel:
    """The model as the peer and the limit hold it: ``predict(float32 matrix)``."""

    def __init__(self, kind: str, path: str) -> None:
        self.kind = kind
        if kind == "xgboost":
            import xgboost

            self._booster = xgboost.Booster(model_file=path)
            self._booster.set_param({"nthread": 1})
        else:
            import keras

            self._model = keras.models.load_model(path, compile=False)

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "xgboost":
            return self._booster.inplace_predict(x, validate_features=False)
        return self._model.predict_on_batch(x)


# -- the peer: a Ray Serve deployment as Ray's docs write one ---------------------------------


def peer_deployment():
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    class Peer:
        def __init__(self, kind: str, path: str) -> None:
            self.model = LocalModel(kind, path)
            self.batches: list[int] = []

        @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
        async def predict(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
            self.batches.append(len(inputs))
            out = self.model.predict(np.concatenate(inputs))
            bounds = np.cumsum([0, *(len(x) for x in inputs)])
            return [out[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

        async def __call__(self, request: Request) -> dict:
            if request.url.path.endswith("/stats"):
                return {"batches": list(self.batches)}
            body = await request.json()
            outputs = await self.predict(np.asarray(body["inputs"], dtype=np.float32))
            return {"outputs": outputs.tolist()}

    return Peer


# -- the limit: the model in-process behind uvicorn ------------------------------------------

_UVICORN_APP = '''
import json, sys, numpy as np
from bench.serving import LocalModel
model = LocalModel(sys.argv[1], sys.argv[2])

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/healthz":
        answer = b"{}"
    else:
        x = np.asarray(json.loads(body)["inputs"], dtype=np.float32)
        answer = json.dumps({"outputs": model.predict(x).tolist()}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": answer})

if __name__ == "__main__":
    import uvicorn
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[3]), log_level="warning")
'''


def start_limit(kind: str, path: Path, port: int, workdir: Path) -> subprocess.Popen:
    script = workdir / "uvicorn_limit.py"
    script.write_text(_UVICORN_APP)
    process = subprocess.Popen([sys.executable, str(script), kind, str(path), str(port)], env={**os.environ, "PYTHONPATH": os.getcwd()})
    _wait(f"http://127.0.0.1:{port}/healthz")
    return process


# -- the load --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(url: str, timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")


async def _load(url: str, bodies: list[bytes], concurrency: int) -> tuple[float, list[float]]:
    """(wall seconds, latencies) of sending every body, ``concurrency`` at a time, each sender on
    one kept-alive HTTP/1.1 connection. Hand-written, so that the load costs little of the CPU the
    servers share with it (an httpx client spends more per request than a bare uvicorn app)."""
    parts = urllib.parse.urlsplit(url)
    head = f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\nContent-Length: "
    latencies: list[float] = []
    queue = list(reversed(bodies))

    async def sender() -> None:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            while queue:
                body = queue.pop()
                started = time.perf_counter()
                writer.write(f"{head}{len(body)}\r\n\r\n".encode() + body)
                status, answer = await _answer(reader)
                latencies.append(time.perf_counter() - started)
                if status != 200:
                    raise RuntimeError(f"{url}: {status} {answer[:200]!r}")
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 response, sized by Content-Length or sent chunked."""
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    body = b""
    while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
        body += (await reader.readexactly(size + 2))[:-2]
    await reader.readuntil(b"\r\n")
    return status, body


def _bodies(width: int, rows: int, count: int, seed: int) -> list[bytes]:
    import json

    rng = np.random.default_rng(seed)
    return [json.dumps({"inputs": rng.random((rows, width)).round(4).tolist()}).encode() for _ in range(count)]


def _batch_counts(metrics: str, function: str) -> tuple[float, float]:
    """(requests, calls) the rayudf replicas coalesced for ``function`` so far."""
    def value(series: str) -> float:
        found = re.search(rf'^{series}{{function="{function}"}} (\S+)$', metrics, re.M)
        return float(found.group(1)) if found else 0.0

    return value("rayudf_batch_requests_sum"), value("rayudf_batch_requests_count")


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    command = " ".join(["python -m bench.serving", *(argv if argv is not None else sys.argv[1:])])
    work = args.workdir
    builds = {
        "xgboost": lambda: (build_booster(work / "booster_16.ubj"), 16),
        "keras": lambda: (build_model(work / "mlp_784.keras", width=784), 784),
    }
    models = {kind: builds[kind]() for kind in args.models.split(",")}
    results: dict[tuple[str, str, str, str], list[float]] = {}
    for mode in args.ingress.split(","):  # each on a Ray of its own: Serve's controller starts in the mode
        os.environ[INGRESS_VARIABLE] = mode
        _measure(args, models, mode, results)
    _report(args, command, results)
    return 0


def _measure(args, models: dict, mode: str, results: dict) -> None:
    """Every contender in ingress ``mode``, ``args.rounds`` interleaved rounds, into ``results``."""
    import httpx
    import ray
    from ray import serve

    from sql_magics import Session

    work = args.workdir
    start_ray()
    session = Session(warm="none")
    port = _free_port()
    for kind, (path, _) in models.items():
        session.register_model(f"m_{kind}", path, workers=2, max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    server = session.serve(port=port)
    print(repr(server), flush=True)
    peer = peer_deployment()
    for kind, (path, _) in models.items():
        serve.run(peer.bind(kind, str(path)), name=f"peer_{kind}", route_prefix=f"/peer/{kind}", blocking=False)
    _wait(f"{server.url}/peer/{list(models)[0]}/stats")

    def record(key: tuple[str, str, str], value: float) -> None:
        results.setdefault((mode, *key), []).append(value)
        print(f"  {mode} / {' / '.join(key)}: {value:,.4g}", flush=True)

    for kind, (path, width) in models.items():
        limit_port = _free_port()
        limit = start_limit(kind, path, limit_port, work)
        urls = {
            "rayudf": f"{server.url}/v1/functions/m_{kind}",
            "peer": f"{server.url}/peer/{kind}",
            "limit": f"http://127.0.0.1:{limit_port}/predict",
        }
        one, bulk = _bodies(width, 1, args.load_requests, seed=1), _bodies(width, 1000, args.bulk_requests, seed=2)
        for url in urls.values():  # warm: graphs traced, connections open
            asyncio.run(_load(url, one[:50], 4))
        for round_ in range(args.rounds):
            print(f"{mode} {kind}: round {round_ + 1}/{args.rounds}", flush=True)
            for name, url in urls.items():
                _, latencies = asyncio.run(_load(url, one[: args.requests], 1))
                latencies.sort()
                record((kind, name, "p50_ms"), 1000 * latencies[len(latencies) // 2])
                record((kind, name, "p99_ms"), 1000 * latencies[int(len(latencies) * 0.99)])
                before = (_batch_counts(httpx.get(f"{server.url}/metrics").text, f"m_{kind}") if name == "rayudf"
                          else len(httpx.get(f"{url}/stats").json()["batches"]) if name == "peer" else 0)
                seconds, _ = asyncio.run(_load(url, one, CONCURRENCY))
                record((kind, name, "rows_per_s_1row"), len(one) / seconds)
                if name == "rayudf":
                    requests, calls = np.subtract(_batch_counts(httpx.get(f"{server.url}/metrics").text, f"m_{kind}"), before)
                    record((kind, name, "mean_batch"), requests / max(calls, 1))
                elif name == "peer":
                    batches = httpx.get(f"{url}/stats").json()["batches"][before:]
                    record((kind, name, "mean_batch"), statistics.mean(batches))
                seconds, _ = asyncio.run(_load(url, bulk, CONCURRENCY))
                record((kind, name, "rows_per_s_1000rows"), 1000 * len(bulk) / seconds)
        limit.terminate()
        limit.wait(timeout=30)
    for kind in models:
        serve.delete(f"peer_{kind}")
    server.stop()
    session.close()
    ray.shutdown()


def _report(args, command: str, results: dict) -> None:
    import ray

    m = {key: statistics.median(values) for key, values in results.items()}
    lines = [
        "# Serving benchmark",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.platform()}, {os.cpu_count()} cores; Python {platform.python_version()}, ray {ray.__version__}  ",
        f"Medians of {args.rounds} interleaved rounds. Latency: {args.requests} 1-row requests one at a time. Throughput: "
        f"{args.load_requests} 1-row and {args.bulk_requests} 1,000-row requests, {CONCURRENCY} at a time, JSON bodies, "
        f"on loopback from one load generator on this machine. rayudf: 2 UDFWorkers, 1 replica; the peer: 1 replica "
        f"holding the model; both coalesce with max_batch_size={MAX_BATCH_SIZE}, batch_wait_timeout_s={BATCH_WAIT_S}.",
        "",
        "Ingress: Serve's own proxy, or HAProxy (Serve's high-throughput mode: `RAY_SERVE_ENABLE_HA_PROXY=1`, "
        "`RAY_SERVE_THROUGHPUT_OPTIMIZED=1`), for rayudf and the peer alike (sql_magics.serving.ingress); the limit has none.",
        "",
        "| model | ingress | measure | rayudf | peer (Ray Serve) | limit (uvicorn) | rayudf / peer | target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind in args.models.split(","):
        label = "XGBoost, 16 columns" if kind == "xgboost" else "Keras MLP 784-512-10"
        for mode in args.ingress.split(","):
            for measure, unit, target in (
                ("p50_ms", "ms", "<= 1.0x"), ("p99_ms", "ms", ""), ("rows_per_s_1row", "rows/s", ">= 1.0x"),
                ("rows_per_s_1000rows", "rows/s", ">= 1.0x"), ("mean_batch", "requests", ">= 8"),
            ):
                values = [m.get((mode, kind, name, measure)) for name in ("rayudf", "peer", "limit")]
                shown = ["" if v is None else f"{v:,.1f}" for v in values]
                ratio = f"{values[0] / values[1]:.2f}x" if values[0] is not None and values[1] else ""
                lines.append(
                    f"| {label} | {INGRESS_MODES[mode]} | {measure} ({unit}) | {shown[0]} | {shown[1]} | {shown[2]} | {ratio} | {target} |"
                )
    lines += ["", "All rounds:", ""]
    lines += [f"- {' / '.join(key)}: " + ", ".join(f"{v:,.4g}" for v in values) for key, values in results.items()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
