"""Text models in a worker: Hugging Face Transformers directories and sentence-transformers models.

A directory saved with ``save_pretrained`` (model, config and tokenizer) or by sentence-transformers
is loaded from its own files (``local_files_only``, the hub offline): nothing is fetched. Each
worker call gets a batch of texts; :meth:`TextModel.predict` tokenizes them once, sorts the rows
by token count, scores them in batches under ``max_batch_tokens`` padded tokens
(:mod:`udf_engine.models.token_batches`), and puts the outputs back in row order. Texts longer
than the model's maximum are truncated and counted (``!workers``' truncated), or with
``truncation="error"`` raise, and the dispatcher names the row.

Tasks of the ``transformers`` kind (``task=``, else read from the config's architecture):

- ``text-classification``: ``STRUCT(label VARCHAR, score FLOAT)`` as Transformers' pipeline
  gives it (softmax; sigmoid for one label or multi-label), or with ``output="scores"`` every
  label's score, ``FLOAT[n]`` in the config's label order.
- ``token-classification``: per row a list of ``STRUCT(entity, word, start, end, score)``, one
  per token whose label is not ``O``, as the pipeline gives it with no aggregation.
- ``feature-extraction``: one ``FLOAT[d]`` embedding per row, pooled (``mean`` over the real
  tokens, or ``cls``) and, with ``normalize=true``, of length 1.
- ``text-generation``: a causal LM's answer to each prompt, continuously batched
  (:mod:`udf_engine.models.generation`).

Example (inside a worker, or in-process for a test):
    >>> defaults = {opt.name: opt.default for opt in TRANSFORMERS_OPTIONS}
    >>> model = load_transformers(Path("clf"), "clf", defaults, threads=1, num_gpus=0)              # doctest: +SKIP
    >>> model.returns, model.predict(np.array(["good", "bad"], dtype=object))["label"]        # doctest: +SKIP
    ('STRUCT(label VARCHAR, score FLOAT)', array(['pos', 'neg'], dtype=object))
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from udf_engine.errors import ModelError
from udf_engine.models.generation import GENERATION, GENERATION_OPTIONS, Generator, generator
from udf_engine.models.token_batches import token_batches
from udf_engine.models.torch_models import DTYPE_OPTION, torch_setup
from udf_engine.settings import Option

TEXT_CLASSIFICATION, TOKEN_CLASSIFICATION, FEATURE_EXTRACTION = "text-classification", "token-classification", "feature-extraction"
TASKS = (TEXT_CLASSIFICATION, TOKEN_CLASSIFICATION, FEATURE_EXTRACTION, GENERATION)
# A config's architecture, by its suffix, and the task its head does (none of these: an encoder's features).
_TASK_OF_HEAD = {
    "ForSequenceClassification": TEXT_CLASSIFICATION, "ForTokenClassification": TOKEN_CLASSIFICATION, "ForCausalLM": GENERATION,
}
# Heads this kind cannot run (encoder-decoder generation, masked-LM and QA heads have no SQL shape here).
_REFUSED_HEADS = ("ForConditionalGeneration", "ForMaskedLM", "ForQuestionAnswering", "ForMultipleChoice")
TRUNCATE, ERROR = TRUNCATIONS = ("truncate", "error")
# token-classification leaves these labels out, as the pipeline does
_IGNORED_LABELS = ("O",)
TOKEN_RETURNS = 'STRUCT(entity VARCHAR, word VARCHAR, "start" INTEGER, "end" INTEGER, score FLOAT)[]'

_COMMON = (
    Option("truncation", TRUNCATE, str, "texts longer than the model's maximum: `truncate` them (counted in `!workers`), or `error` "
           "naming the row", choices=TRUNCATIONS),
    Option("max_batch_tokens", 8192, int, "text models: padded tokens per batch on the model; a worker's rows are sorted by length "
           "and cut under this budget"),
    DTYPE_OPTION,
)
TRANSFORMERS_OPTIONS: tuple[Option, ...] = (
    Option("task", None, str, "transformers: `text-classification`, `token-classification`, `feature-extraction` or "
           "`text-generation`; none: read from the config's architecture", choices=TASKS),
    Option("output", "label", str, "text-classification: `label` (the top label and its score) or `scores` (every label's, `FLOAT[n]`)",
           choices=("label", "scores")),
    Option("pooling", "mean", str, "feature-extraction: `mean` of the real tokens' states, or the first (`cls`) token's",
           choices=("mean", "cls")),
    Option("normalize", False, bool, "feature-extraction: scale each embedding to length 1"),
    Option("max_length", None, int, "text models: tokens a text may have; none: the model's own maximum"),
    *_COMMON,
    *GENERATION_OPTIONS,
)
SENTENCE_TRANSFORMERS_OPTIONS: tuple[Option, ...] = _COMMON


def offline() -> None:
    """The hub's client never goes online in this process: a model's files are all it reads."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the worker's threads are its CPU share


def _texts(batch: Any) -> list[str]:
    array = np.asarray(batch, dtype=object)
    return [str(t) for t in (array[:, 0] if array.ndim == 2 else array)]


class TextModel:
    """Tokenize, sort by length, score under a token budget, restore the order: what every text model shares.

    A subclass gives :meth:`_score` (one length-sorted group's outputs, a list per row) and :meth:`_joined`.
    """

    takes_text = True  # the worker reports TEXT_INPUT as the width: one VARCHAR argument

    def __init__(
        self, tokenizer: Any, *, device: Any, max_length: int, max_batch_tokens: int, truncation: str, returns: str, info: dict
    ) -> None:
        self.tokenizer, self.max_length, self.max_batch_tokens, self.truncation = tokenizer, max_length, max_batch_tokens, truncation
        self.device = device
        self._inputs = [name for name in tokenizer.model_input_names if name in ("input_ids", "attention_mask", "token_type_ids")]
        self.returns = returns  # the DuckDB type of what predict gives: a probe is not needed
        self.load_info = {**info, "max_length": max_length, "max_batch_tokens": max_batch_tokens}
        self._counts_lock = threading.Lock()
        self.truncated = 0  # texts cut to max_length since the model loaded
        self.tokens = 0  # real tokens scored
        self.padded = 0  # tokens scored, padding included

    def counts(self) -> dict:
        """What !workers shows of this model's work."""
        with self._counts_lock:
            return {"truncated": self.truncated, "tokens": self.tokens, "padded_tokens": self.padded}

    def encode(self, texts: list[str], **extra: Any) -> dict:
        """The texts' token ids (special tokens in), each at most max_length long: an overlong one truncated
        and counted, or with truncation="error" a ValueError (the dispatcher then names the row)."""
        encoded = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False, **extra)
        long = [i for i, ids in enumerate(encoded["input_ids"]) if len(ids) > self.max_length]
        if long and self.truncation == ERROR:
            count = len(encoded["input_ids"][long[0]])
            raise ValueError(f'a text of {count} tokens is longer than the model\'s {self.max_length} (truncation="error")')
        if long:
            cut = self.tokenizer([texts[i] for i in long], add_special_tokens=True, truncation=True, max_length=self.max_length, **extra)
            for key in encoded:
                for j, i in enumerate(long):
                    encoded[key][i] = cut[key][j]
            with self._counts_lock:
                self.truncated += len(long)
        return encoded

    def predict(self, batch: Any) -> Any:
        texts = _texts(batch)
        encoded = self.encode(texts, **self._encode_extra())
        lengths = [len(ids) for ids in encoded["input_ids"]]
        rows: list[Any] = [None] * len(texts)
        padded = 0
        for group in token_batches(lengths, self.max_batch_tokens):
            padded += len(group) * max(lengths[i] for i in group)
            for i, out in zip(group, self._score(group, encoded), strict=True):
                rows[i] = out
        with self._counts_lock:
            self.tokens += sum(lengths)
            self.padded += padded
        return self._joined(rows)

    def _encode_extra(self) -> dict:
        return {}

    def _padded(self, group: np.ndarray, encoded: Mapping[str, list]) -> dict:
        """The group's model inputs as tensors on the model's device, padded to the group's longest text."""
        padded = self.tokenizer.pad([{k: encoded[k][i] for k in self._inputs} for i in group], return_tensors="pt")
        return {k: v.to(self.device) for k, v in padded.items()}

    def _score(self, group: np.ndarray, encoded: Mapping[str, list]) -> list:
        raise NotImplementedError

    def _joined(self, rows: list) -> Any:
        return np.stack(rows).astype(np.float32) if rows else np.empty((0, 0), np.float32)


class TransformersModel(TextModel):
    """A ``save_pretrained`` directory run for one task (see the module's docstring)."""

    def __init__(self, model: Any, tokenizer: Any, task: str, options: Mapping[str, Any], *, device: Any, info: dict) -> None:
        config = model.config
        self.model, self.task, self.options = model, task, options
        self.labels = [config.id2label[i] for i in range(config.num_labels)] if task != FEATURE_EXTRACTION else []
        self._sigmoid = config.problem_type == "multi_label_classification" or config.num_labels == 1
        super().__init__(
            tokenizer, device=device, max_length=_max_length(tokenizer, config, options.get("max_length")),
            max_batch_tokens=options["max_batch_tokens"], truncation=options["truncation"], returns=self._returns(config), info=info,
        )

    def _returns(self, config: Any) -> str:
        if self.task == TEXT_CLASSIFICATION:
            return f"FLOAT[{len(self.labels)}]" if self.options["output"] == "scores" else "STRUCT(label VARCHAR, score FLOAT)"
        if self.task == TOKEN_CLASSIFICATION:
            return TOKEN_RETURNS
        return f"FLOAT[{config.hidden_size}]"

    def _encode_extra(self) -> dict:
        if self.task == TOKEN_CLASSIFICATION:
            return {"return_offsets_mapping": True, "return_special_tokens_mask": True}
        return {}

    def _score(self, group: np.ndarray, encoded: Mapping[str, list]) -> list:
        import torch

        padded = self._padded(group, encoded)
        with torch.inference_mode():
            out = self.model(**padded)
        if self.task == FEATURE_EXTRACTION:
            return list(self._pooled(out.last_hidden_state, padded["attention_mask"]).float().cpu().numpy())
        logits = out.logits.float().cpu()
        if self.task == TEXT_CLASSIFICATION:
            scores = (logits.sigmoid() if self._sigmoid else logits.softmax(-1)).numpy()
            return list(scores)
        return [self._entities(encoded, i, probs) for i, probs in zip(group, logits.softmax(-1).numpy(), strict=True)]

    def _pooled(self, states: Any, mask: Any) -> Any:
        if self.options["pooling"] == "cls":
            pooled = states[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1)
        if self.options["normalize"]:
            pooled = pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return pooled

    def _entities(self, encoded: Mapping[str, list], row: int, probs: np.ndarray) -> list[dict]:
        """One row's tokens that carry a label, as the token-classification pipeline lists them
        (``probs``: its tokens' label probabilities, padding included)."""
        ids, offsets, special = (encoded[key][row] for key in ("input_ids", "offset_mapping", "special_tokens_mask"))
        first = len(probs) - len(ids) if self.tokenizer.padding_side == "left" else 0
        words = self.tokenizer.convert_ids_to_tokens(ids)
        found = []
        for j in range(len(ids)):
            token = probs[first + j]
            label = self.labels[int(token.argmax())]
            if special[j] or label in _IGNORED_LABELS:
                continue
            start, end = offsets[j]
            found.append({"entity": label, "word": words[j], "start": int(start), "end": int(end), "score": float(token.max())})
        return found

    def _joined(self, rows: list) -> Any:
        if self.task == TOKEN_CLASSIFICATION:
            return rows
        scores = np.stack(rows).astype(np.float32) if rows else np.empty((0, len(self.labels) or 1), np.float32)
        if self.task == TEXT_CLASSIFICATION and self.options["output"] == "label":
            best = scores.argmax(axis=1) if len(scores) else np.empty(0, np.int64)
            labels = np.array(self.labels, dtype=object)
            return {"label": labels[best], "score": scores[np.arange(len(scores)), best]}
        return scores


class SentenceEmbedder(TextModel):
    """A sentence-transformers model: its own pooling and normalization, ``FLOAT[d]`` per row."""

    def __init__(self, model: Any, options: Mapping[str, Any], *, info: dict) -> None:
        self.model = model
        super().__init__(
            model.tokenizer, device=model.device, max_length=int(model.max_seq_length), max_batch_tokens=options["max_batch_tokens"],
            truncation=options["truncation"], returns=f"FLOAT[{_dimension(model)}]", info=info,
        )

    def _score(self, group: np.ndarray, encoded: Mapping[str, list]) -> list:
        import torch

        # the modules encode() runs (the transformer, its pooling, its normalization), on the texts tokenized once here
        with torch.inference_mode():
            vectors = self.model(self._padded(group, encoded))["sentence_embedding"]
        return list(vectors.float().cpu().numpy())


def _dimension(model: Any) -> int:
    """A sentence-transformers model's embedding width (the method's name changed in its 5.x releases)."""
    named = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(named())


def _max_length(tokenizer: Any, config: Any, given: int | None) -> int:
    """The tokens a text may have: ``given``, else the least of the tokenizer's and the position embeddings' bounds."""
    if given is not None:
        return given
    bounds = [int(b) for b in (getattr(tokenizer, "model_max_length", None), getattr(config, "max_position_embeddings", None))
              if isinstance(b, int) and 0 < b < 1_000_000]
    return min(bounds) if bounds else 512


def detect_task(config: Any) -> tuple[str, str]:
    """The task a config's architecture does, and where that was read (for ``!models``).

    Example:
        >>> from types import SimpleNamespace
        >>> detect_task(SimpleNamespace(architectures=["BertForSequenceClassification"]))
        ('text-classification', 'config.json: BertForSequenceClassification')
    """
    architectures = list(getattr(config, "architectures", None) or [])
    name = architectures[0] if architectures else type(config).__name__
    if any(name.endswith(head) for head in _REFUSED_HEADS):
        raise ModelError(f"a {name} model is not one the transformers kind runs (tasks: {', '.join(TASKS)})")
    task = next((t for head, t in _TASK_OF_HEAD.items() if name.endswith(head)), FEATURE_EXTRACTION)
    return task, f"config.json: {name}"


def load_transformers(
    path: Path, name: str, options: Mapping[str, Any], *, threads: int, num_gpus: float
) -> TransformersModel | Generator:
    """Load a ``save_pretrained`` directory for its task (``options``: TRANSFORMERS_OPTIONS' values)."""
    offline()
    device, dtype = torch_setup(dtype=options["dtype"], threads=threads, num_gpus=num_gpus)
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        task, source = (options["task"], "given") if options.get("task") else detect_task(config)
        auto: Callable = {
            TEXT_CLASSIFICATION: transformers.AutoModelForSequenceClassification,
            TOKEN_CLASSIFICATION: transformers.AutoModelForTokenClassification,
            FEATURE_EXTRACTION: transformers.AutoModel,
            GENERATION: transformers.AutoModelForCausalLM,
        }[task].from_pretrained
        model = auto(path, local_files_only=True, dtype=dtype).to(device).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except ModelError:
        raise
    except Exception as err:  # noqa: BLE001 - any loader failure is a model problem for the user
        raise ModelError(f"cannot load transformers model {name!r}: {err}") from None
    if task == GENERATION:
        return generator(model, tokenizer, options, name=name, task_from=source, device=device)
    return transformers_model(model, tokenizer, task, options, name=name, task_from=source, device=device)


def transformers_model(
    model: Any, tokenizer: Any, task: str, options: Mapping[str, Any], *, name: str, task_from: str, device: Any
) -> TransformersModel:
    """A loaded model and tokenizer (on ``device``, in ``eval()``) run for ``task``: ``task_from`` says where the task was read."""
    if task == TOKEN_CLASSIFICATION and not tokenizer.is_fast:
        raise ModelError(f"transformers model {name!r}: token-classification needs a fast tokenizer (tokenizer.json) for offsets")
    info = {"task": task, "task_from": task_from, "device": str(device), "dtype": options["dtype"]}
    return TransformersModel(model, tokenizer, task, options, device=device, info=info)


def load_sentence_transformer(path: Path, name: str, options: Mapping[str, Any], *, threads: int, num_gpus: float) -> SentenceEmbedder:
    """Load a directory a sentence-transformers model was saved to."""
    offline()
    device, dtype = torch_setup(dtype=options["dtype"], threads=threads, num_gpus=num_gpus)
    try:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(path), device=str(device), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any loader failure is a model problem for the user
        raise ModelError(f"cannot load sentence-transformers model {name!r}: {err}") from None
    return sentence_embedder(model, options, device=device, dtype=dtype, task_from="sentence-transformers")


def sentence_embedder(model: Any, options: Mapping[str, Any], *, device: Any, dtype: Any, task_from: str) -> SentenceEmbedder:
    """A loaded ``SentenceTransformer`` moved to ``device`` in ``dtype`` and run as an embedder."""
    model = model.to(device).eval()
    if options["dtype"] != "float32":
        model = model.to(dtype)
    info = {"task": FEATURE_EXTRACTION, "task_from": task_from, "device": str(device), "dtype": options["dtype"]}
    return SentenceEmbedder(model, options, info=info)
