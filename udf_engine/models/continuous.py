"""Continuous batching of a causal LM inside one worker: every prompt, from any call, joins one running batch.

A :class:`ContinuousBatcher` runs one decode loop on a thread of its own while there is work. Each
step it lets waiting sequences in (under ``max_batch_tokens``: the prompt and answer tokens of the
running sequences), runs their prompts in one forward pass, merges their key/value cache into the
running batch's (left-padded, so every row's next token sits in the same column), then generates
one token for every running sequence in one forward pass. A sequence that ends (its end-of-sequence
token, ``max_new_tokens``, a stop string) leaves the batch at once and its caller is answered: a
long answer never holds a short one, and a new prompt never waits for a whole batch to finish.

Each sequence samples with its own ``torch.Generator`` seeded by its caller, so its text is the same
whatever else runs beside it, and the same again when its batch is retried elsewhere; with
``temperature`` 0 (the default) it is greedy. The processors are Transformers' own (temperature,
then top-p), in the order ``generate`` applies them.

Example (inside a worker, or in-process for a test):
    >>> batcher = ContinuousBatcher(model, tokenizer, device="cpu", max_batch_tokens=8192)   # doctest: +SKIP
    >>> seq = Sequence(tokenizer("Hello").input_ids, Sampling(max_new_tokens=8))          # doctest: +SKIP
    >>> batcher.submit([seq]); seq.wait().text                                            # doctest: +SKIP
    ' world, and all'
"""

from __future__ import annotations

import inspect
import threading
import time
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

from udf_engine.models.token_batches import token_batches

# Why a sequence ended, as OpenAI names it: its end-of-sequence token or a stop string, or max_new_tokens.
STOP, LENGTH = "stop", "length"
# Padded prompt tokens one forward pass runs when sequences join. The prompts are sorted by length
# and cut under this, so a short prompt is not padded to a long one's length: with short answers the
# prompts are most of the work (500 prompts of ~130 tokens, 32 new tokens each: padding all the prompts
# that join at once to the longest made generation 15% slower than static batches of 8).
PREFILL_TOKENS = 2048
# A streamed sequence whose reader went away (the HTTP client closed): it leaves the batch at its next step.
CANCELLED = "cancelled"


@dataclass(frozen=True)
class Sampling:
    """How one sequence is generated."""

    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # strings that end the answer (left out of it)
    seed: int = 0  # the sequence's generator's seed (sampling only)


class Sequence:
    """One prompt being answered: its tokens, how it samples, and (once :meth:`wait` returns) its text.

    ``on_text(piece)`` (streaming) is called from the decode loop with each piece of text as it is
    generated (a piece that may be the start of a stop string is held back until it is not), and with
    None once the sequence has finished or failed.
    """

    def __init__(self, ids: Seq[int], sampling: Sampling, *, on_text: Callable[[str], None] | None = None) -> None:
        self.ids = list(ids)  # the prompt's token ids
        self.sampling = sampling
        self.on_text = on_text
        self.generated: list[int] = []  # token ids generated so far (the end-of-sequence token left out)
        self.text = ""  # the answer, once finished
        self.finish_reason: str | None = None  # STOP, LENGTH or CANCELLED, once finished
        self.error: BaseException | None = None  # what failed the decode loop while this sequence was in it
        self.cancelled = False  # set by the reader: leave at the next step
        self.submitted = time.perf_counter()
        self.first_token_s: float | None = None  # seconds from submit to the first token
        self._streamed = 0  # characters of text given to on_text
        self._done = threading.Event()
        self._generator: Any = None  # made in the decode loop (torch is imported there)

    def wait(self, timeout: float | None = None) -> Sequence:
        """Block until the sequence has finished (or failed: then raise what failed it)."""
        if not self._done.wait(timeout):
            raise TimeoutError("the sequence did not finish in time")
        if self.error is not None:
            raise self.error
        return self

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _finish(self, reason: str | None, text: str = "", error: BaseException | None = None) -> None:
        self.finish_reason, self.text, self.error = reason, text, error
        if error is None and self.on_text is not None and len(text) > self._streamed:
            self.on_text(text[self._streamed :])
        self._done.set()
        if self.on_text is not None:
            self.on_text(None)


class ContinuousBatcher:
    """One running batch per model: :meth:`submit` queues sequences; a thread decodes while any run or wait."""

    def __init__(self, model: Any, tokenizer: Any, *, device: Any, max_batch_tokens: int) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.max_batch_tokens = max_batch_tokens
        eos = model.generation_config.eos_token_id
        eos = eos if eos is not None else tokenizer.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])  # token ids that end a sequence
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(self._eos) if self._eos else 0)
        forward = inspect.signature(model.forward).parameters
        # Transformers 5.2x names the cache argument `cache` (`past_key_values` before, deprecated since)
        self._cache_arg = "cache" if "cache" in forward else "past_key_values"
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}  # no logits for a prompt's other tokens
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()  # submitted, not yet in the batch
        self._thread: threading.Thread | None = None  # the decode loop, while there is work
        # the running batch (touched by the decode loop alone): its sequences, their key/value cache,
        # attention mask (0: a padding column) and the token each generated last
        self._rows: list[Sequence] = []
        self._joining: list[Sequence] = []  # let in from the queue, their prompts being run
        self._cache: Any = None
        self._mask: Any = None
        self._last: Any = None
        # counters for !workers and /metrics
        self.tokens = 0  # tokens generated
        self.prompt_tokens = 0  # prompt tokens run
        self.steps = 0  # decode steps
        self.row_steps = 0  # sequences summed over decode steps: occupancy = row_steps / steps
        self.finished = 0  # sequences answered

    def submit(self, sequences: Seq[Sequence]) -> None:
        """Queue ``sequences``; they join the running batch at its next step."""
        with self._cond:
            self._waiting.extend(sequences)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="rayudf-generate", daemon=True)
                self._thread.start()
            self._cond.notify()

    def counts(self) -> dict:
        """What !workers shows: tokens generated, sequences running and waiting, and the mean batch occupancy."""
        with self._cond:
            waiting = len(self._waiting)
        return {
            "generated_tokens": self.tokens, "running": len(self._rows), "waiting": waiting,
            "occupancy": round(self.row_steps / self.steps, 2) if self.steps else 0.0,
        }

    # -- the decode loop ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._waiting and not self._rows:
                    self._thread = None  # no thread (and no reference to the model) is left behind idle
                    return
            try:
                self._admit()
                if self._rows:
                    self._step()
            except BaseException as err:  # noqa: BLE001 - every sequence in the batch learns what failed it
                self._fail_all(err)

    def _fail_all(self, err: BaseException) -> None:
        with self._cond:
            failed, self._waiting = [*self._rows, *self._waiting], deque()
        failed += [s for s in self._joining if not any(s is f for f in failed)]  # let in, not yet in the batch
        self._rows, self._cache, self._joining = [], None, []
        for seq in failed:
            if not seq.done:
                seq._finish(None, error=err)

    def _admit(self) -> None:
        """Let in the waiting sequences that fit the token budget (one at least when none runs) and run their prompts."""
        used = sum(len(s.ids) + s.sampling.max_new_tokens for s in self._rows)
        new: list[Sequence] = []
        with self._cond:
            while self._waiting:
                seq = self._waiting[0]
                cost = len(seq.ids) + seq.sampling.max_new_tokens
                if (self._rows or new) and used + cost > self.max_batch_tokens:
                    break
                used += cost
                new.append(self._waiting.popleft())
        for seq in [s for s in new if s.cancelled]:
            seq._finish(CANCELLED)
            new.remove(seq)
        self._joining = new
        for group in token_batches([len(s.ids) for s in new], PREFILL_TOKENS):
            self._prefill([new[i] for i in group])
        self._joining = []

    def _prefill(self, new: list[Sequence]) -> None:
        import torch
        from transformers import DynamicCache

        length = max(len(s.ids) for s in new)
        ids = torch.full((len(new), length), self._pad, dtype=torch.long)
        mask = torch.zeros((len(new), length), dtype=torch.long)
        for i, seq in enumerate(new):
            ids[i, length - len(seq.ids) :] = torch.tensor(seq.ids)
            mask[i, length - len(seq.ids) :] = 1
            if seq.sampling.temperature > 0:
                seq._generator = torch.Generator(device="cpu").manual_seed(seq.sampling.seed)
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache)
        self.prompt_tokens += sum(len(s.ids) for s in new)
        self._merge(new, cache, mask, self._sampled(new, logits))

    def _forward(self, ids: Any, mask: Any, positions: Any, cache: Any) -> Any:
        """The model's next-token logits after ``ids`` (one row per sequence), ``cache`` filled in place."""
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{self._cache_arg: cache},
                             **self._last_only)
        return out.logits[:, -1, :]

    def _merge(self, new: list[Sequence], cache: Any, mask: Any, tokens: Any) -> None:
        """Join the new sequences' cache to the running batch's, both left-padded to the longer."""
        import torch
        from transformers import DynamicCache

        if not self._rows:
            self._rows, self._cache, self._mask, self._last = new, cache, mask, tokens
        else:
            width = max(self._mask.shape[1], mask.shape[1])

            def padded(t: Any, dim: int) -> Any:
                short = width - t.shape[dim]
                if not short:
                    return t
                shape = list(t.shape)
                shape[dim] = short
                return torch.cat([t.new_zeros(shape), t], dim=dim)

            layers = [
                (torch.cat([padded(a.keys, 2), padded(b.keys, 2)]), torch.cat([padded(a.values, 2), padded(b.values, 2)]))
                for a, b in zip(self._cache.layers, cache.layers, strict=True)
            ]
            self._cache = DynamicCache(ddp_cache_data=layers, config=self.model.config)
            self._mask = torch.cat([padded(self._mask, 1), padded(mask, 1)])
            self._rows = [*self._rows, *new]
            self._last = torch.cat([self._last, tokens])
        self._advance(new, tokens)

    def _step(self) -> None:
        """One token for every running sequence."""
        import torch

        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self._rows), 1))], dim=1)
        logits = self._forward(self._last.unsqueeze(-1), self._mask, self._mask.sum(-1, keepdim=True) - 1, self._cache)
        self.steps += 1
        self.row_steps += len(self._rows)
        self._last = self._sampled(self._rows, logits)
        self._advance(self._rows, self._last)

    def _sampled(self, rows: list[Sequence], logits: Any) -> Any:
        """Each row's next token: the most likely (greedy), or drawn with the row's generator after
        Transformers' temperature and top-p processors, as ``generate(do_sample=True)`` draws it."""
        import torch
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

        logits = logits.float()
        tokens = logits.argmax(-1)
        for i, seq in enumerate(rows):
            sampling = seq.sampling
            if sampling.temperature <= 0:
                continue
            scores = TemperatureLogitsWarper(sampling.temperature)(None, logits[i : i + 1].cpu())
            if sampling.top_p < 1.0:
                scores = TopPLogitsWarper(sampling.top_p)(None, scores)
            tokens[i] = torch.multinomial(scores.softmax(-1), 1, generator=seq._generator)[0, 0]
        return tokens

    def _advance(self, rows: list[Sequence], tokens: Any) -> None:
        """Give each row its new token; rows that end leave the batch (and the cache its all-padding columns)."""
        now = time.perf_counter()
        keep = []
        for i, (seq, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            if seq.first_token_s is None:
                seq.first_token_s = now - seq.submitted
            self.tokens += 1
            reason = self._reason(seq, token)
            if reason is None:
                keep.append(i)
            else:
                self.finished += 1
                seq._finish(reason, self._text(seq)[0] if reason != CANCELLED else "")
        if rows is self._rows and len(keep) < len(rows):
            self._keep(keep)

    def _reason(self, seq: Sequence, token: int) -> str | None:
        """Why ``seq`` ends with ``token``, or None while it goes on."""
        if seq.cancelled:
            return CANCELLED
        if token in self._eos:
            return STOP
        seq.generated.append(token)
        if seq.sampling.stop or seq.on_text is not None:
            text, stopped = self._text(seq)
            if stopped:
                return STOP
            if seq.on_text is not None:
                self._stream(seq, text)
        return LENGTH if len(seq.generated) >= seq.sampling.max_new_tokens else None

    def _text(self, seq: Sequence) -> tuple[str, bool]:
        """The sequence's text so far, cut before its first stop string, and whether one was found."""
        text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        cuts = [text.find(stop) for stop in seq.sampling.stop if stop and stop in text]
        return (text[: min(cuts)], True) if cuts else (text, False)

    def _stream(self, seq: Sequence, text: str) -> None:
        """Hand the reader the text not yet streamed, holding back a tail that may start a stop string
        or is half a character (a byte-level token that ends inside one decodes as U+FFFD)."""
        ready = len(text.rstrip("\ufffd"))
        for stop in seq.sampling.stop:
            for size in range(min(len(stop) - 1, ready), 0, -1):
                if text[:ready].endswith(stop[:size]):
                    ready = min(ready, len(text[:ready]) - size)
                    break
        if ready > seq._streamed:
            seq.on_text(text[seq._streamed : ready])
            seq._streamed = ready

    def _keep(self, keep: list[int]) -> None:
        import torch
        from transformers import DynamicCache

        if not keep:
            self._rows, self._cache, self._mask, self._last = [], None, None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        first = int(mask.any(0).int().argmax())  # columns before it are padding in every row left
        self._cache = DynamicCache(
            ddp_cache_data=[(layer.keys.index_select(0, index)[:, :, first:], layer.values.index_select(0, index)[:, :, first:])
                            for layer in self._cache.layers],
            config=self.model.config,
        )
        self._mask, self._last = mask[:, first:], self._last.index_select(0, index)
        self._rows = [self._rows[i] for i in keep]
