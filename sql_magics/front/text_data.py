"""Text models and texts made on this machine, for the tests, the benchmark and the text-model demo:
nothing is downloaded.

The texts are the docstrings of Python's own standard library, which every Python installation
ships. The tokenizer is a WordPiece vocabulary trained on them with ``tokenizers``; the models are
BERT-shaped, built from a config with random weights (their speed depends on their shape alone)
and saved with ``save_pretrained``, as a user's fine-tuned model would be (needs ``rayudf[text]``).

Example:
    >>> paths = save_text_models(Path("models"), TINY)                 # doctest: +SKIP
    >>> sorted(paths)                                                  # doctest: +SKIP
    ['classifier', 'encoder', 'tagger']
    >>> save_sentence_transformer(paths["encoder"], Path("models"), TINY)  # doctest: +SKIP
    PosixPath('models/sentences')
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LABELS = ("negative", "positive", "neutral")
TAGS = ("O", "B-NAME", "I-NAME")


@dataclass(frozen=True)
class Shape:
    """A BERT's shape: what its speed depends on."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_length: int  # tokens a text may have
    vocab: int


TINY = Shape(hidden=32, layers=2, heads=2, intermediate=64, max_length=48, vocab=600)  # the tests': texts past 48 tokens are cut
MINILM_L6 = Shape(hidden=384, layers=6, heads=12, intermediate=1536, max_length=512, vocab=8000)  # all-MiniLM-L6-v2's shape


def stdlib_texts() -> list[str]:
    """Lines of the docstrings of some standard-library modules and their members: a few thousand lines of English."""
    import collections
    import json
    import pathlib
    import string
    import textwrap

    texts = []
    for module in (collections, json, pathlib, string, textwrap):
        texts.append(inspect.getdoc(module) or "")
        texts += [inspect.getdoc(getattr(module, name)) or "" for name in dir(module) if not name.startswith("_")]
    return [line for text in texts for line in text.splitlines() if line.strip()]


# Standard-library modules whose docstrings the demo classifier learns to tell apart, one label each.
TOPICS = ("tarfile", "socket", "statistics", "logging")


def module_lines(modules: tuple[str, ...] = TOPICS, *, min_words: int = 4) -> list[tuple[str, str]]:
    """(line, module) for each docstring line of ``modules`` (the module's, its members' and their
    methods'), of at least ``min_words`` words: a labelled text set. A line found in two modules is left out.

    Example:
        >>> rows = module_lines(("json", "textwrap"))
        >>> sorted({module for _, module in rows}), all(len(line.split()) >= 4 for line, _ in rows)
        (['json', 'textwrap'], True)
    """
    import importlib
    from collections import Counter

    found: dict[str, list[str]] = {}
    for name in modules:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module) or ""]
        for member in (getattr(module, attr) for attr in dir(module) if not attr.startswith("_")):
            docs.append(inspect.getdoc(member) or "")
            if inspect.isclass(member):
                docs += [inspect.getdoc(value) or "" for attr, value in vars(member).items() if not attr.startswith("_")]
        lines = (line.strip() for doc in docs for line in doc.splitlines())
        found[name] = list(dict.fromkeys(line for line in lines if len(line.split()) >= min_words))
    seen = Counter(line for lines in found.values() for line in lines)
    return [(line, name) for name, lines in found.items() for line in lines if seen[line] == 1]


def tokenizer(shape: Shape, texts: list[str] | None = None) -> Any:
    """A BERT-style WordPiece tokenizer trained on ``texts`` (else :func:`stdlib_texts`), as Transformers' fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts or stdlib_texts(), trainers.WordPieceTrainer(vocab_size=shape.vocab, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        model_max_length=shape.max_length,
    )


def bert_config(shape: Shape, labels: tuple[str, ...] = (), *, for_training: bool = False) -> Any:
    """A BERT config of ``shape`` (a classifier's when ``labels`` are given). Its random weights are
    drawn wide, so an untrained model's outputs differ from row to row; ``for_training``: as BERT draws them."""
    from transformers import BertConfig

    named = {"id2label": dict(enumerate(labels)), "label2id": {v: i for i, v in enumerate(labels)}} if labels else {}
    return BertConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        intermediate_size=shape.intermediate, max_position_embeddings=shape.max_length, initializer_range=0.02 if for_training else 0.5,
        **named,
    )


def save_text_models(root: Path, shape: Shape, *, seed: int = 7) -> dict[str, Path]:
    """A text classifier (LABELS), a token classifier (TAGS) and an encoder of ``shape``, each a
    ``save_pretrained`` directory (model, config, tokenizer) under ``root``."""
    import torch
    from transformers import BertForSequenceClassification, BertForTokenClassification, BertModel

    tok = tokenizer(shape)
    made = {}
    for name, cls, labels in (
        ("classifier", BertForSequenceClassification, LABELS), ("tagger", BertForTokenClassification, TAGS), ("encoder", BertModel, ()),
    ):
        torch.manual_seed(seed)
        made[name] = root / name
        cls(bert_config(shape, labels)).eval().save_pretrained(made[name])
        tok.save_pretrained(made[name])
    return made


def save_sentence_transformer(encoder: Path, root: Path, shape: Shape) -> Path:
    """``encoder`` as a sentence-transformers model (mean pooling, then normalized), saved under ``root``."""
    from sentence_transformers import SentenceTransformer, models

    words = models.Transformer(str(encoder), max_seq_length=shape.max_length)
    model = SentenceTransformer(modules=[words, models.Pooling(shape.hidden, pooling_mode="mean"), models.Normalize()], device="cpu")
    path = root / "sentences"
    model.save(str(path))
    return path


# A chat model's special tokens, and the chat template its tokenizer carries (one turn: <|role|>content<|end|>).
CHAT_SPECIALS = ("<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TINY_CHAT = Shape(hidden=64, layers=2, heads=4, intermediate=128, max_length=256, vocab=2000)  # the tests' causal LM
BENCH_CHAT = Shape(hidden=256, layers=4, heads=4, intermediate=768, max_length=512, vocab=4000)  # bench.llm's: a few hundred tokens/s here


def chat_tokenizer(shape: Shape) -> Any:
    """A byte-level BPE tokenizer (as GPT-2's and Llama 3's are) trained on :func:`stdlib_texts`, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=shape.vocab, special_tokens=list(CHAT_SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(stdlib_texts(), trainer)
    made = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=shape.max_length
    )
    made.chat_template = CHAT_TEMPLATE
    return made


def save_chat_model(root: Path, shape: Shape, *, seed: int = 3) -> Path:
    """A Llama-shaped causal LM of ``shape`` with random weights and its chat tokenizer, saved with ``save_pretrained``
    under ``root/chat``. Its weights are drawn wide, so its greedy answers differ from prompt to prompt."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = chat_tokenizer(shape)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=max(1, shape.heads // 2), max_position_embeddings=shape.max_length,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, initializer_range=0.2,
    )
    torch.manual_seed(seed)
    path = root / "chat"
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path
