"""``python -m bench.llm``: generation through SQL and OpenAI-compatible HTTP against the usual ways to run an LLM.

Model: a Llama-shaped causal LM with random weights (speed depends on shape), small enough that
this CPU generates a few hundred tokens a second in-process (sql_magics/front/text_data.py).

SQL workload: prompts of mixed length (5 to 150 words of standard-library English) in a Parquet
file, ``NEW_TOKENS`` new tokens each, greedy. Contenders, each answering every prompt:
- **static batches** (the naive way): ``model.generate`` on 8 prompts at a time, left-padded, in file order;
- **continuous batching in-process** (the limit): Transformers' own ``model.generate_batch``;
- **rayudf's batcher in-process**: the decode loop rayudf's workers run
  (``udf_engine.models.continuous``), in this process, every prompt at once;
- **Ray Data**: ``map_batches`` with an actor pool of 2 holding the model, static batches of 8;
- **rayudf**: the model registered on 2 workers, ``select chat(prompt) from read_parquet(...)``;
  each worker runs its rows in one continuous batch.

HTTP workload: ``--requests`` streamed chat completions at concurrency ``--concurrency``, on loopback:
- **rayudf serve**: ``/v1/chat/completions`` with ``stream: true`` on the same 2 workers;
- **one request at a time**: the design document's deployment, one ``generate`` per request in a
  ``@serve.deployment`` (a replica with the model, answering when the whole text is made);
- **@serve.batch**: the same deployment with its requests batched by ``@serve.batch`` (8 at most).

Reported: generated tokens/s, and for HTTP the p50/p99 time to first token. Rounds interleave.

Example:
    $ python -m bench.llm --prompts 100 --requests 16 --rounds 1     # a quick look
    $ make bench                                                     # with the rest of the benchmark
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.data import start_ray

NEW_TOKENS = 32
STATIC_BATCH = 8  # prompts a batch for the contenders that batch statically
SQL_TARGETS = {"static batches": 1.5, "continuous in-process": 0.9}
HTTP_TARGETS = {"one at a time": 2.0, "@serve.batch": 1.2}


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.llm", description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=500, help="prompts of the SQL workload")
    p.add_argument("--requests", type=int, default=64, help="streamed chat completions of the HTTP workload")
    p.add_argument("--concurrency", type=int, default=16, help="HTTP requests in flight at once")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds of each contender")
    p.add_argument("--only", choices=("sql", "http"), help="run one workload alone")
    p.add_argument("--workdir", type=Path, default=Path("bench_data") / "llm", help="where the prompts and the model go")
    p.add_argument("--out", type=Path, default=Path("bench/LLM.md"), help="the report")
    return p.parse_args(argv)


# -- the prompts and the model ---------------------------------------------------------------------


def write_prompts(path: Path, count: int, seed: int = 0) -> Path:
    from sql_magics.front.text_data import stdlib_texts

    words = " ".join(stdlib_texts()).split()
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 150, count)
    starts = rng.integers(0, len(words) - 150, count)
    prompts = [" ".join(words[s : s + n]) for s, n in zip(starts, lengths, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": np.arange(count), "prompt": prompts}), path)
    return path


def build_model(workdir: Path) -> Path:
    from sql_magics.front.text_data import BENCH_CHAT, save_chat_model

    if not (workdir / "chat" / "config.json").exists():
        save_chat_model(workdir, BENCH_CHAT)
    return workdir / "chat"


_LOADED: dict[str, Any] = {}


def local_model(path: Path) -> tuple[Any, Any]:
    """The model and tokenizer in this process (once)."""
    import transformers

    if str(path) not in _LOADED:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        tokenizer.padding_side = "left"
        _LOADED[str(path)] = (transformers.AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer)
    return _LOADED[str(path)]


def static_batches(model: Any, tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """``generate`` on STATIC_BATCH prompts at a time: each batch runs until its longest answer ends."""
    import torch

    answers = []
    for i in range(0, len(prompts), STATIC_BATCH):
        batch = tokenizer(prompts[i : i + STATIC_BATCH], return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers += [row[batch["input_ids"].shape[1] :].tolist() for row in out]
    return answers


# -- the SQL contenders ----------------------------------------------------------------------------


def run_static(path: Path, prompts: list[str]) -> int:
    model, tokenizer = local_model(path)
    return sum(_generated(a, tokenizer) for a in static_batches(model, tokenizer, prompts))


def run_continuous(path: Path, prompts: list[str]) -> int:
    from transformers import GenerationConfig

    model, tokenizer = local_model(path)
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    out = model.generate_batch(inputs=[tokenizer(p).input_ids for p in prompts], generation_config=config, warmup=False)
    return sum(len(o.generated_tokens) for o in out.values())


def run_batcher(path: Path, prompts: list[str]) -> int:
    """rayudf's own ContinuousBatcher in this process, every prompt at once: the limit of what its workers do."""
    from udf_engine.models.continuous import ContinuousBatcher, Sampling, Sequence

    model, tokenizer = local_model(path)
    batcher = ContinuousBatcher(model, tokenizer, device="cpu", max_batch_tokens=8192)
    sequences = [Sequence(tokenizer(p).input_ids, Sampling(max_new_tokens=NEW_TOKENS)) for p in prompts]
    batcher.submit(sequences)
    return sum(len(s.wait().generated) for s in sequences)


def _generated(ids: list[int], tokenizer: Any) -> int:
    """Tokens an answer has, up to its end-of-sequence token (padding after it left out)."""
    return ids.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in ids else len(ids)


class RayDataGenerator:
    """The peer: the callable class users hand to map_batches, holding the same model, static batches."""

    def __init__(self, path: str) -> None:
        self.model, self.tokenizer = local_model(Path(path))

    def __call__(self, batch: dict) -> dict:
        answers = static_batches(self.model, self.tokenizer, list(batch["prompt"]))
        return {"tokens": np.array([_generated(a, self.tokenizer) for a in answers])}


def run_ray_data(path: Path, data: Path) -> int:
    import ray.data

    ds = ray.data.read_parquet(str(data), override_num_blocks=8).select_columns(["prompt"]).map_batches(
        RayDataGenerator, fn_constructor_args=(str(path),), compute=ray.data.ActorPoolStrategy(size=2), batch_size=STATIC_BATCH,
        batch_format="numpy", num_cpus=0.5,
    )
    return int(sum(b["tokens"].sum() for b in ds.iter_batches(batch_format="numpy", batch_size=None)))


def run_rayudf(session: Any, data: Path) -> int:
    rows = session.con.execute(f"select chat(prompt).completion_tokens from read_parquet('{data}')").fetchall()
    return sum(n for (n,) in rows)


# -- the HTTP contenders ---------------------------------------------------------------------------


def http_peers(path: str):
    """The design document's deployment (one ``generate`` per request), and the same with ``@serve.batch``."""
    from ray import serve
    from starlette.requests import Request

    def messages_ids(tokenizer: Any, body: dict) -> list[int]:
        text = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    class OneAtATime:
        def __init__(self) -> None:
            self.model, self.tokenizer = local_model(Path(path))

        async def __call__(self, request: Request) -> dict:
            import torch

            body = await request.json()
            ids = torch.tensor([messages_ids(self.tokenizer, body)])
            with torch.inference_mode():
                out = await asyncio.to_thread(self.model.generate, ids, attention_mask=torch.ones_like(ids),
                                              max_new_tokens=body["max_tokens"], do_sample=False)
            return {"tokens": _generated(out[0, ids.shape[1] :].tolist(), self.tokenizer)}

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    class Batched:
        def __init__(self) -> None:
            self.model, self.tokenizer = local_model(Path(path))

        @serve.batch(max_batch_size=STATIC_BATCH, batch_wait_timeout_s=0.01)
        async def generate(self, bodies: list[dict]) -> list[int]:
            texts = [self.tokenizer.apply_chat_template(b["messages"], add_generation_prompt=True, tokenize=False) for b in bodies]
            answers = await asyncio.to_thread(static_batches, self.model, self.tokenizer, texts)
            return [_generated(a, self.tokenizer) for a in answers]

        async def __call__(self, request: Request) -> dict:
            return {"tokens": await self.generate(await request.json())}

    return OneAtATime, Batched


async def _one(client: Any, url: str, body: dict, streamed: bool) -> tuple[float, int]:
    """(seconds to the first token, tokens) of one request: the first SSE chunk with text, or the whole answer."""
    started = time.perf_counter()
    if not streamed:
        answer = await client.post(url, json=body)
        answer.raise_for_status()
        return time.perf_counter() - started, answer.json()["tokens"]
    first, tokens = None, 0
    async with client.stream("POST", url, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as answer:
        answer.raise_for_status()
        async for line in answer.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (first if first is not None else time.perf_counter() - started), tokens


async def http_load(url: str, bodies: list[dict], concurrency: int, *, streamed: bool, headers: dict) -> tuple[float, list[float], int]:
    """(seconds, times to first token, tokens) of all ``bodies`` at ``concurrency``."""
    import httpx

    todo = iter(bodies)
    firsts: list[float] = []
    tokens = 0

    async def worker(client: Any) -> None:
        nonlocal tokens
        for body in todo:
            first, made = await _one(client, url, body, streamed)
            firsts.append(first)
            tokens += made

    started = time.perf_counter()
    async with httpx.AsyncClient(headers=headers, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return time.perf_counter() - started, firsts, tokens


# -- the run ---------------------------------------------------------------------------------------


def timed(work: Callable[[], int]) -> tuple[float, int]:
    started = time.perf_counter()
    tokens = work()
    return time.perf_counter() - started, tokens


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray
    from ray import serve

    from bench.serving import _free_port
    from sql_magics import Session
    from sql_magics.front.text_data import stdlib_texts

    command = " ".join(["python -m bench.llm", *(argv if argv is not None else sys.argv[1:])])
    path = build_model(args.workdir)
    data = write_prompts(args.workdir / f"prompts_{args.prompts}.parquet", args.prompts)
    prompts = pq.read_table(data)["prompt"].to_pylist()
    start_ray()
    session = Session(warm="none")
    usage = "STRUCT(text VARCHAR, completion_tokens INT)"
    session.sql(f'register transformers.`{path}` as chat where workers="2" and num_cpus="0.5" and max_new_tokens="{NEW_TOKENS}" '
                f"and returns='{usage}'")
    sql: dict[str, list[tuple[float, int]]] = {}
    runs = {
        "static batches": lambda: run_static(path, prompts),
        "continuous in-process": lambda: run_continuous(path, prompts),
        "rayudf's batcher in-process": lambda: run_batcher(path, prompts),
        "Ray Data": lambda: run_ray_data(path, data),
        "rayudf": lambda: run_rayudf(session, data),
    }
    local_model(path)  # loaded once, before any contender is timed
    if args.only != "http":
        run_continuous(path, prompts[:8])  # Transformers' manager warms up once
    for round_ in range(args.rounds if args.only != "http" else 0):
        for name, run in runs.items():
            sql.setdefault(name, []).append(timed(run))
            print(f"sql round {round_ + 1}: {name}: {sql[name][-1][0]:.1f} s, {sql[name][-1][1]:,} tokens", flush=True)

    token = "bench-token"
    port = _free_port()
    server = session.serve(port=port, token=token)
    one, batched = http_peers(str(path))
    serve.run(one.bind(), name="llm_one", route_prefix="/one", blocking=False)
    serve.run(batched.bind(), name="llm_batched", route_prefix="/batched", blocking=False)
    lines = stdlib_texts()
    rng = np.random.default_rng(1)
    bodies = [{"model": "chat", "max_tokens": NEW_TOKENS, "messages": [{"role": "user", "content": " ".join(lines[i : i + 3])}]}
              for i in rng.integers(0, len(lines) - 3, args.requests)]
    urls = {"rayudf serve": (f"{server.url}/v1/chat/completions", True), "one at a time": (f"{server.url}/one", False),
            "@serve.batch": (f"{server.url}/batched", False)}
    headers = {"Authorization": f"Bearer {token}"}
    for url, streamed in urls.values():  # warm: connections open, the replicas' models loaded
        asyncio.run(http_load(url, bodies[:2], 2, streamed=streamed, headers=headers))
    http: dict[str, list[tuple[float, list[float], int]]] = {}
    for round_ in range(args.rounds if args.only != "sql" else 0):
        for name, (url, streamed) in urls.items():
            http.setdefault(name, []).append(asyncio.run(http_load(url, bodies, args.concurrency, streamed=streamed, headers=headers)))
            print(f"http round {round_ + 1}: {name}: {http[name][-1][0]:.1f} s, {http[name][-1][2]:,} tokens", flush=True)
    occupancy = [s.get("occupancy") for s in session.functions["chat"].udf.stats()]
    serve.delete("llm_one")
    serve.delete("llm_batched")
    server.stop()
    session.close()
    ray.shutdown()
    text = report(args, command, sql, http, occupancy)
    args.out.write_text(text + "\n")
    print(text)
    return 0


def _median_rate(runs: list[tuple]) -> float:
    return statistics.median(run[-1] / run[0] for run in runs)


def report(args: argparse.Namespace, command: str, sql: dict, http: dict, occupancy: list) -> str:
    import ray

    from sql_magics.front.text_data import BENCH_CHAT

    shape = BENCH_CHAT
    lines = [
        "# LLM benchmark", "",
        f"Command: `{command}`  ",
        f"Machine: {platform.platform()}, {os.cpu_count()} cores; Python {platform.python_version()}, ray {ray.__version__}  ",
        f"Model: Llama-shaped, {shape.layers} layers, {shape.hidden} wide, vocabulary {shape.vocab}, random weights. "
        f"{args.prompts} prompts of 5 to 150 words, {NEW_TOKENS} new tokens each, greedy. Medians of {args.rounds} interleaved "
        "round(s); rayudf's model registered on 2 workers before the run.", "",
        "## SQL", "", "| contender | generated tokens/s | rayudf against it | target |", "| --- | --- | --- | --- |",
    ]
    rates = {name: _median_rate(runs) for name, runs in sql.items()}
    for name, rate in rates.items():
        target = SQL_TARGETS.get(name)
        ratio = "" if name == "rayudf" else f"{rates['rayudf'] / rate:.2f}x"
        lines.append(f"| {name} | {rate:,.0f} | {ratio} | {f'>= {target}x' if target else ''} |")
    lines += ["", f"rayudf's workers' mean batch occupancy (sequences per decode step): {occupancy}.", "",
              f"## HTTP: {args.requests} chat completions at concurrency {args.concurrency}", "",
              "| contender | generated tokens/s | p50 first token | p99 first token | rayudf against it | target |",
              "| --- | --- | --- | --- | --- | --- |"]
    rates = {name: _median_rate(runs) for name, runs in http.items()}
    for name, runs in http.items():
        firsts = sorted(f for run in runs for f in run[1])
        target = HTTP_TARGETS.get(name)
        ratio = "" if name == "rayudf serve" else f"{rates['rayudf serve'] / rates[name]:.2f}x"
        lines.append(f"| {name} | {rates[name]:,.0f} | {1000 * firsts[len(firsts) // 2]:,.0f} ms | "
                     f"{1000 * firsts[min(len(firsts) - 1, int(len(firsts) * 0.99))]:,.0f} ms | {ratio} | "
                     f"{f'>= {target}x' if target else ''} |")
    lines += ["", "Rayudf's answers stream (the first token is the time to the first SSE chunk with text); the two "
              "deployments answer when the whole text is made, so their first token is their whole answer's time."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
