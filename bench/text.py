"""``python -m bench.text``: text models through SQL against the same models in-process and on Ray Data.

Workload: texts of mixed length (a long tail from 3 to 400 words of standard-library English) in
a Parquet file, and two MiniLM-L6-shaped models with random weights (speed depends on shape):
a text classifier and a sentence-transformers embedder (sql_magics/front/text_data.py).

Contenders, each scoring every text and bringing the answers to this process:
- **in-process**: Transformers' ``pipeline(..., batch_size=32)`` over the texts in file order
  (the embedder: ``SentenceTransformer.encode`` on 32 texts at a time, in file order);
- **length-sorted** (the limit): the same, with the texts sorted by token count first (the
  embedder: one ``encode`` of all the texts, which sorts them itself);
- **Ray Data** (the peer): ``map_batches`` with an actor pool of 2 holding the same pipeline,
  32 texts a batch, end to end (the actors start in the run);
- **rayudf**: the model registered on 2 workers (registered before the run), ``select f(body)
  from read_parquet(...)``; each worker sorts its texts by token count and batches them under
  ``max_batch_tokens``.

Reported: rows/s, tokens/s (real tokens, truncated at 512), the padding share (padded tokens over
real tokens), the peak memory of rayudf's workers, and the time from ``register`` to the first
row when warm torch spares wait (``Session(warm="torch")``). Rounds interleave the contenders.

Example:
    $ python -m bench.text --rows 2000 --rounds 1      # a quick look
    $ make bench                                        # with the rest of the benchmark
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.data import start_ray
from bench.memory import PeakRSS
from udf_engine.models.token_batches import padding_share

BATCH = 32  # texts a batch, for every contender that batches by rows
TARGETS = {"in-process": 1.3, "length-sorted": 0.95, "Ray Data": 1.2}  # rayudf's speed over each, at least (classifier)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.text", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000, help="texts to score")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds of each contender")
    p.add_argument("--models", default="classifier,embedder", help="which models, comma-separated: classifier,embedder")
    p.add_argument("--workdir", type=Path, default=Path("bench_data") / "text", help="where the texts and models go")
    p.add_argument("--out", type=Path, default=Path("bench/TEXT.md"), help="the report")
    return p.parse_args(argv)


# -- the texts and models -------------------------------------------------------------------------


def write_texts(path: Path, rows: int, seed: int = 0) -> Path:
    """``rows`` texts (id, body) of 3 to 400 words with a long tail (most short, a few long), words from the stdlib's docstrings."""
    from sql_magics.front.text_data import stdlib_texts

    words = " ".join(stdlib_texts()).split()
    rng = np.random.default_rng(seed)
    lengths = np.clip(3 + (rng.pareto(1.2, rows) * 12).astype(int), 3, 400)
    starts = rng.integers(0, len(words) - 400, rows)
    bodies = [" ".join(words[s : s + n]) for s, n in zip(starts, lengths, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": np.arange(rows), "body": bodies}), path, row_group_size=4096)
    return path


def build_models(workdir: Path) -> dict[str, Path]:
    from sql_magics.front.text_data import MINILM_L6, save_sentence_transformer, save_text_models

    root = workdir / "models"
    if not (root / "sentences").exists():
        made = save_text_models(root, MINILM_L6)
        save_sentence_transformer(made["encoder"], root, MINILM_L6)
    return {"classifier": root / "classifier", "embedder": root / "sentences"}


def token_counts(texts: list[str], model_dir: Path) -> np.ndarray:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return np.array([len(ids) for ids in tokenizer(texts, truncation=True, max_length=512)["input_ids"]])


# -- the contenders -------------------------------------------------------------------------------


def in_process(kind: str, model: Path, texts: list[str], *, sort_by: np.ndarray | None) -> int:
    """The model in this process, 32 texts a batch: in file order, or sorted by ``sort_by`` (token counts)."""
    order = np.arange(len(texts)) if sort_by is None else np.argsort(sort_by, kind="stable")
    ordered = [texts[i] for i in order]
    if kind == "classifier":
        pipe = _pipeline(model)
        answers = pipe(ordered, batch_size=BATCH, truncation=True)
    else:
        encoder = _encoder(model)
        if sort_by is None:
            answers = [v for i in range(0, len(ordered), BATCH) for v in encoder.encode(ordered[i : i + BATCH], batch_size=BATCH)]
        else:
            answers = list(encoder.encode(ordered, batch_size=BATCH))
    restored: list[Any] = [None] * len(texts)
    for i, answer in zip(order, answers, strict=True):
        restored[i] = answer
    return len(restored)


_LOADED: dict[Path, Any] = {}


def _pipeline(model: Path) -> Any:
    import transformers

    return _LOADED.setdefault(model, transformers.pipeline("text-classification", model=str(model), device="cpu"))


def _encoder(model: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return _LOADED.setdefault(model, SentenceTransformer(str(model), device="cpu"))


class RayDataText:
    """The peer: the callable class users hand to Ray Data's map_batches, holding the same model."""

    def __init__(self, kind: str, model: str) -> None:
        self.kind = kind
        self.model = _pipeline(Path(model)) if kind == "classifier" else _encoder(Path(model))

    def __call__(self, batch: dict) -> dict:
        texts = list(batch["body"])
        if self.kind == "classifier":
            answers = self.model(texts, batch_size=BATCH, truncation=True)
            return {"label": np.array([a["label"] for a in answers]), "score": np.array([a["score"] for a in answers])}
        return {"vector": self.model.encode(texts, batch_size=BATCH)}


def ray_data(kind: str, model: Path, data: Path) -> int:
    import ray.data

    # blocks enough for both actors; half a CPU each, as rayudf's workers reserve (both get one math thread from Ray)
    ds = ray.data.read_parquet(str(data), override_num_blocks=8).select_columns(["body"]).map_batches(
        RayDataText, fn_constructor_args=(kind, str(model)), compute=ray.data.ActorPoolStrategy(size=2), batch_size=BATCH,
        batch_format="numpy", num_cpus=0.5,
    )
    return sum(len(next(iter(b.values()))) for b in ds.iter_batches(batch_format="numpy", batch_size=None))


def rayudf_run(session: Any, function: str, data: Path) -> int:
    return len(session.con.execute(f"select {function}(body) as y from read_parquet('{data}')").fetchall())


def first_row_after_register(kind: str, model: Path) -> float:
    """Seconds from ``register`` to the first answer, in a new session whose warm torch spares wait."""
    from sql_magics import Session

    with Session(warm="torch") as fresh:
        deadline = time.monotonic() + 120
        while not _spares_ready(fresh, 2) and time.monotonic() < deadline:
            time.sleep(0.5)
        started = time.perf_counter()
        fresh.sql(f"register {'transformers' if kind == 'classifier' else 'sentence_transformers'}.`{model}` as first_f")
        fresh.con.execute("select first_f('the first text')").fetchall()
        return time.perf_counter() - started


def _spares_ready(session: Any, count: int) -> bool:
    import ray

    from udf_engine.actors.warm_pool import find_pool

    pool = find_pool(session.registry.pool_name)
    spares = [] if pool is None else ray.get(pool.spares.remote())
    return sum(s["imported"] for s in ray.get([h.stats.remote() for h in spares])) >= count


# -- the run --------------------------------------------------------------------------------------


def timed(work: Callable[[], int], rows: int) -> float:
    started = time.perf_counter()
    done = work()
    seconds = time.perf_counter() - started
    assert done == rows, f"{done} answers for {rows} rows"
    return seconds


def bench_model(kind: str, model: Path, data: Path, texts: list[str], lengths: np.ndarray, rounds: int) -> dict:
    from sql_magics import Session

    rows = len(texts)
    kinds = {"classifier": "transformers", "embedder": "sentence_transformers"}
    seconds: dict[str, list[float]] = {name: [] for name in ("in-process", "length-sorted", "Ray Data", "rayudf")}
    with Session(warm="none") as session:
        session.sql(f'register {kinds[kind]}.`{model}` as f where workers="2" and num_cpus="0.5"')
        udf = session.functions["f"].udf
        pids = {f"worker {i}": s["pid"] for i, s in enumerate(udf.stats())}
        counted = [sum(s.get(k, 0) for s in udf.stats()) for k in ("tokens", "padded_tokens")]
        peak: dict[str, float] = {}
        for _ in range(rounds):
            seconds["in-process"].append(timed(lambda: in_process(kind, model, texts, sort_by=None), rows))
            seconds["length-sorted"].append(timed(lambda: in_process(kind, model, texts, sort_by=lengths), rows))
            seconds["Ray Data"].append(timed(lambda: ray_data(kind, model, data), rows))
            with PeakRSS(pids) as peaks:
                seconds["rayudf"].append(timed(lambda: rayudf_run(session, "f", data), rows))
            peak = {name: max(peak.get(name, 0.0), mb) for name, mb in peaks.peak_mb.items()}
        now = [sum(s.get(k, 0) for s in udf.stats()) for k in ("tokens", "padded_tokens")]
        tokens, padded = now[0] - counted[0], now[1] - counted[1]
    order = np.arange(rows)
    by_length = np.argsort(lengths, kind="stable")
    shares = {
        "in-process": padding_share(lengths, [order[i : i + BATCH] for i in range(0, rows, BATCH)]),
        "length-sorted": padding_share(lengths, [by_length[i : i + BATCH] for i in range(0, rows, BATCH)]),
        "Ray Data": padding_share(lengths, [order[i : i + BATCH] for i in range(0, rows, BATCH)]),
        "rayudf": round(padded / tokens - 1, 6) if tokens else float("nan"),
    }
    return {"seconds": seconds, "shares": shares, "peak_mb": peak, "first_row_s": first_row_after_register(kind, model)}


def report(args: argparse.Namespace, results: dict, rows: int, tokens: int) -> str:
    import ray

    lines = [
        "# Text-model benchmark", "",
        f"Command: `python -m bench.text --rows {args.rows} --rounds {args.rounds} --models {args.models}`  ",
        f"Machine: {platform.platform()}, {os.cpu_count()} cores; Python {platform.python_version()}, ray {ray.__version__}  ",
        f"{rows:,} texts of 3 to 400 words (long-tailed), {tokens:,} tokens after truncation at 512; MiniLM-L6-shaped models "
        f"(6 layers, 384 wide, random weights). Medians of {args.rounds} interleaved round(s); rayudf's model registered before "
        "the run, Ray Data's actors started in it.", "",
    ]
    for kind, result in results.items():
        median = {name: statistics.median(s) for name, s in result["seconds"].items()}
        lines += [f"## {kind}", "", "| contender | rows/s | tokens/s | padding share | rayudf against it | target |"]
        lines += ["| --- | --- | --- | --- | --- | --- |"]
        for name, seconds in median.items():
            ratio = median[name] / median["rayudf"]
            target = f">= {TARGETS[name]}x" if kind == "classifier" and name in TARGETS else ""
            lines.append(f"| {name} | {rows / seconds:,.0f} | {tokens / seconds:,.0f} | {result['shares'][name]:.2f} | "
                         f"{'' if name == 'rayudf' else f'{ratio:.2f}x'} | {target} |")
        peaks = ", ".join(f"{name} {mb:,.0f} MiB" for name, mb in result["peak_mb"].items())
        lines += ["", f"Peak RSS of rayudf's workers: {peaks}. From `register` to the first row with warm torch spares: "
                  f"{result['first_row_s']:.2f} s (target <= 3 s).", "",
                  "All rounds (seconds): " + "; ".join(f"{n}: {', '.join(f'{s:.1f}' for s in v)}" for n, v in result["seconds"].items()),
                  ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    models = build_models(args.workdir)
    data = write_texts(args.workdir / f"texts_{args.rows}.parquet", args.rows)
    texts = pq.read_table(data)["body"].to_pylist()
    lengths = token_counts(texts, models["classifier"])
    start_ray()
    results = {kind: bench_model(kind, models[kind], data, texts, lengths, args.rounds) for kind in args.models.split(",")}
    text = report(args, results, len(texts), int(lengths.sum()))
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
