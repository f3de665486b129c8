"""Text generation in a worker: a causal LM saved with ``save_pretrained``, continuously batched.

``register transformers.`llm` as chat where task="text-generation"`` loads the directory's model
and tokenizer; :meth:`Generator.predict` answers a batch of prompts, :meth:`Generator.stream` one
prompt piece by piece (the OpenAI endpoints' ``stream: true``). Both hand their prompts to the
worker's one :class:`~udf_engine.models.continuous.ContinuousBatcher`, so rows of SQL calls and HTTP
requests share one running batch.

A row is a prompt and, optionally, its own parameters (a JSON object or a STRUCT/MAP) that override
the registration's options: ``max_new_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``,
``system``. A prompt is used as it is written, unless it is a list of chat messages
(``[{"role": "user", "content": "..."}]``, as JSON or a list of STRUCTs) or a ``system`` prompt is
given: then the tokenizer's chat template makes the model's input. Decoding is greedy unless
``temperature`` is above 0; then each row's generator is seeded from (``seed``, its prompt, its
place among the equal prompts of its call), so a batch retried after a worker died, or the same
query run again, gives the very same text.

The answer is VARCHAR, or with ``returns="STRUCT(text VARCHAR, prompt_tokens INT, completion_tokens
INT, finish_reason VARCHAR)"`` (any of those fields) the usage as well.

Example (inside a worker, or in-process for a test):
    >>> model = load_generator(Path("llm"), "chat", {**GENERATION_DEFAULTS, "max_new_tokens": 8}, threads=1, num_gpus=0)  # doctest: +SKIP
    >>> model.predict(np.array(["The sum of"], dtype=object))                                 # doctest: +SKIP
    array([' all values in the list'], dtype=object)
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from udf_engine.errors import ModelError
from udf_engine.models.continuous import ContinuousBatcher, Sampling, Sequence
from udf_engine.settings import Option

GENERATION = "text-generation"
# The fields of the usage STRUCT a generation function may return, in OpenAI's names.
USAGE_FIELDS = ("text", "prompt_tokens", "completion_tokens", "finish_reason")
GENERATION_OPTIONS: tuple[Option, ...] = (
    Option("max_new_tokens", 64, int, "text-generation: tokens an answer may have"),
    Option("temperature", 0.0, float, "text-generation: 0 decodes greedily; above 0 samples, each row with a generator of its own"),
    Option("top_p", 1.0, float, "text-generation, sampling: draw from the fewest tokens whose probabilities sum to this"),
    Option("stop", None, str, "text-generation: a string that ends an answer (left out of it), or a JSON array of them"),
    Option("seed", 0, int, "text-generation, sampling: each row's generator is seeded from this, its prompt and its place among "
           "equal prompts"),
    Option("system", None, str, "text-generation: a system prompt; each prompt then goes through the tokenizer's chat template"),
)
# The options a row's own parameters may override.
ROW_PARAMETERS = tuple(opt.name for opt in GENERATION_OPTIONS)
GENERATION_DEFAULTS = {opt.name: opt.default for opt in GENERATION_OPTIONS}
# Stop strings a row may have (OpenAI takes 4).
MAX_STOPS = 16
# The conf key under which the registry hands a loader the result type the registration declared.
DECLARED_RETURNS = "returns"
# How long a stream's reader waits for the next piece before it looks whether the worker still decodes.
_STREAM_POLL_S = 1.0
# While more than STREAMS_ONE_BY_ONE streams are open on a worker, a streamed answer's pieces after its
# first are sent at most every STREAM_FLUSH_S, each with the tokens made since; with fewer, token by token.
# Every event is a Ray object to the replica, one to Serve's proxy and an HTTP chunk, which together cost
# more CPU than a small model's token: 64 streams of 32 tokens at concurrency 16 on 2 cores made 403
# tokens/s sent token by token, 583 sent every 0.1 s (the replica and proxy's CPU halved).
STREAMS_ONE_BY_ONE = 2
STREAM_FLUSH_S = 0.1


def row_seed(seed: int, prompt: str, occurrence: int) -> int:
    """The seed of one row's generator: from the registration's (or row's) ``seed``, the prompt, and
    which of the equal prompts of its call it is (so equal prompts sample differently, and alike on a retry).

    Example:
        >>> row_seed(0, "hi", 0) == row_seed(0, "hi", 0) != row_seed(0, "hi", 1)
        True
    """
    digest = hashlib.sha256(f"{seed}\x00{occurrence}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class Row:
    """One prompt to answer: its text or chat messages, the parameters that override the options, its place among equal prompts."""

    prompt: Any
    params: Any = None  # a dict, a JSON object's text, or None
    occurrence: int = 0


def rows_of(batch: Any) -> list[Row]:
    """A worker's batch as rows: prompts alone (a 1-D array), or ``(prompt, params, occurrence)`` rows (arrow_bridge's)."""
    array = np.asarray(batch, dtype=object)
    if array.ndim == 1:
        return [Row(prompt) for prompt in array]
    return [Row(*row) for row in array]


class Generator:
    """A causal LM and its tokenizer, answering prompts through one continuous batcher (see the module's docstring)."""

    takes_prompts = True  # the worker reports PROMPT_INPUT as the width: a prompt, and parameters if any
    concurrent = True  # calls run at once: their rows join one running batch, the batcher keeps the model to one thread

    def __init__(self, model: Any, tokenizer: Any, options: Mapping[str, Any], *, device: Any, info: dict) -> None:
        self.tokenizer, self.options = tokenizer, dict(options)
        declared = options.get(DECLARED_RETURNS) or ""
        self.usage = declared.strip().upper().startswith("STRUCT")
        self.returns = declared if self.usage else "VARCHAR"
        self.max_positions = _max_positions(tokenizer, model.config)
        self.batcher = ContinuousBatcher(model, tokenizer, device=device, max_batch_tokens=options["max_batch_tokens"])
        self.load_info = {**info, "max_positions": self.max_positions, "max_batch_tokens": options["max_batch_tokens"]}
        self._streams_lock = threading.Lock()
        self._streams = 0  # streamed answers open now
        _parameters(self.options, {}, "the options")  # a bad option fails the load, naming it

    def counts(self) -> dict:
        """What !workers shows: tokens generated, sequences running and waiting, the batch's mean occupancy."""
        return self.batcher.counts()

    def predict(self, batch: Any) -> Any:
        """Answer every row of ``batch`` (see :func:`rows_of`): texts, or the usage STRUCT's columns.

        Every row is checked before any is generated, so a bad row (too long a prompt, a bad parameter)
        raises at once and the dispatcher, splitting the batch to name it, generates no row twice.
        """
        sequences = [self._sequence(row) for row in rows_of(batch)]
        self.batcher.submit(sequences)
        for seq in sequences:
            seq.wait()
        texts = np.array([seq.text for seq in sequences], dtype=object)
        if not self.usage:
            return texts
        return {
            "text": texts,
            "prompt_tokens": np.array([len(seq.ids) for seq in sequences], np.int32),
            "completion_tokens": np.array([len(seq.generated) for seq in sequences], np.int32),
            "finish_reason": np.array([seq.finish_reason for seq in sequences], dtype=object),
        }

    def stream(self, prompt: Any, params: Any = None) -> Iterator[dict]:
        """One prompt's answer as it is generated: ``{"text": piece}`` events, then ``{"finish_reason",
        "prompt_tokens", "completion_tokens"}``. Closing the iterator early leaves the sequence at the batch's next step."""
        pieces: queue.SimpleQueue = queue.SimpleQueue()
        seq = self._sequence(Row(prompt, params), on_text=pieces.put)
        self.batcher.submit([seq])
        flushed = 0.0  # when an event was last sent: the first piece goes at once
        with self._streams_lock:
            self._streams += 1
        try:
            while True:
                try:
                    piece = pieces.get(timeout=_STREAM_POLL_S)
                except queue.Empty:
                    continue
                held = [piece]
                flush_s = STREAM_FLUSH_S if self._streams > STREAMS_ONE_BY_ONE else 0.0
                while piece is not None and (wait := flushed + flush_s - time.perf_counter()) > 0:
                    try:
                        piece = pieces.get(timeout=wait)
                    except queue.Empty:
                        break
                    held.append(piece)
                text = "".join(p for p in held if p is not None)
                if text:
                    yield {"text": text}
                    flushed = time.perf_counter()
                if piece is None:
                    break
        finally:
            seq.cancelled = not seq.done
            with self._streams_lock:
                self._streams -= 1
        seq.wait()
        yield {"finish_reason": seq.finish_reason, "prompt_tokens": len(seq.ids), "completion_tokens": len(seq.generated)}

    def _sequence(self, row: Row, on_text: Any = None) -> Sequence:
        given = _parameters(self.options, row.params, "the row's parameters")
        text, templated = _prompt_text(row.prompt, given["system"], self.tokenizer)
        ids = self.tokenizer(text, add_special_tokens=not templated, verbose=False)["input_ids"]  # a template has its own
        if len(ids) + given["max_new_tokens"] > self.max_positions:
            raise ValueError(
                f"a prompt of {len(ids)} tokens and max_new_tokens {given['max_new_tokens']} do not fit the model's "
                f"{self.max_positions} positions"
            )
        sampling = Sampling(
            max_new_tokens=given["max_new_tokens"], temperature=given["temperature"], top_p=given["top_p"], stop=given["stop"],
            seed=row_seed(given["seed"], text, row.occurrence),
        )
        return Sequence(ids, sampling, on_text=on_text)


def _parameters(options: Mapping[str, Any], params: Any, where: str) -> dict:
    """The options with a row's ``params`` (a dict or a JSON object's text) over them, each checked."""
    if isinstance(params, str):
        try:
            params = json.loads(params)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} are not a JSON object: {err}") from None
    if isinstance(params, list):  # a MAP as Arrow gives it: (key, value) pairs
        params = dict(params)
    if params is not None and not isinstance(params, Mapping):
        raise ValueError(f"{where} are {type(params).__name__}, not an object of parameters")
    given = {k: v for k, v in (params or {}).items() if v is not None}
    unknown = sorted(set(given) - set(ROW_PARAMETERS))
    if unknown:
        raise ValueError(f"{where}: unknown parameter(s) {', '.join(unknown)} (a row may set: {', '.join(ROW_PARAMETERS)})")
    values = {name: given.get(name, options.get(name, GENERATION_DEFAULTS[name])) for name in ROW_PARAMETERS}
    try:
        values["max_new_tokens"], values["seed"] = int(values["max_new_tokens"]), int(values["seed"])
        values["temperature"], values["top_p"] = float(values["temperature"]), float(values["top_p"])
    except (TypeError, ValueError):
        raise ValueError(f"{where}: max_new_tokens and seed take integers, temperature and top_p numbers") from None
    if values["max_new_tokens"] < 1 or values["temperature"] < 0 or not 0 < values["top_p"] <= 1:
        raise ValueError(f"{where}: max_new_tokens must be at least 1, temperature at least 0, top_p in (0, 1]")
    values["stop"] = _stops(values["stop"], where)
    return values


def _stops(stop: Any, where: str) -> tuple[str, ...]:
    """``stop`` as a tuple of strings: none, one string, a JSON array's text or a list."""
    if isinstance(stop, str) and stop.startswith("["):
        try:
            stop = json.loads(stop)
        except json.JSONDecodeError:
            return (stop,)
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list | tuple) else None
    if stops is None or not all(isinstance(s, str) for s in stops):
        raise ValueError(f"{where}: stop takes a string or a list of strings")
    if len(stops) > MAX_STOPS:  # each is looked for in the answer at every token
        raise ValueError(f"{where}: stop takes at most {MAX_STOPS} strings, got {len(stops)}")
    return stops


def _messages(prompt: Any) -> list[dict] | None:
    """The chat messages ``prompt`` is (a list of {role, content}, or its JSON text), or None for a plain prompt."""
    if isinstance(prompt, str):
        if not prompt.lstrip().startswith("["):
            return None
        try:
            prompt = json.loads(prompt)
        except json.JSONDecodeError:
            return None
    if isinstance(prompt, list | tuple | np.ndarray) and all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
    ):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    if isinstance(prompt, str):
        return None
    raise ValueError("a prompt is a text or a list of messages, each with a role and a content")


def _prompt_text(prompt: Any, system: str | None, tokenizer: Any) -> tuple[str, bool]:
    """The model's input text, and whether the chat template made it: the prompt as written, or its
    messages (with ``system`` first) through the template."""
    messages = _messages(prompt)
    if messages is None and system is None:
        return str(prompt), False
    messages = messages if messages is not None else [{"role": "user", "content": str(prompt)}]
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the model's tokenizer has no chat template: give the prompt as plain text, and no system prompt")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), True


def _max_positions(tokenizer: Any, config: Any) -> int:
    """Tokens a prompt and its answer may have together: the least of the config's and the tokenizer's bounds."""
    bounds = [int(b) for b in (getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None))
              if isinstance(b, int) and 0 < b < 10_000_000]
    return min(bounds) if bounds else 2048


def generator(model: Any, tokenizer: Any, options: Mapping[str, Any], *, name: str, task_from: str, device: Any) -> Generator:
    """A loaded causal LM and its tokenizer (on ``device``, in ``eval()``) as a Generator."""
    info = {"task": GENERATION, "task_from": task_from, "device": str(device), "dtype": options["dtype"]}
    try:
        return Generator(model, tokenizer, options, device=device, info=info)
    except ValueError as err:
        raise ModelError(f"generation model {name!r}: {err}") from None
