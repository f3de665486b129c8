"""What a model fails on: finding the failing rows of a batch by scoring it in halves.

Both the dispatcher (halves sent to workers) and a worker scanning its own share of a
file (halves scored in its process) use these, with a ``run`` that scores some batches
and gives each one's output, or a :class:`Failed` where the model raised.

``on_error="raise"`` names the first row the model fails on alone (:func:`raise_located`);
``on_error="null"`` splits until the failing rows stand alone and gives a :class:`Partial`
result with None for them (:func:`isolate`).

Example:
    >>> def run(batches):  # a model that fails on negative numbers
    ...     return [Failed(ModelError("negative")) if min(b) < 0 else [x * 2 for x in b] for b in batches]
    >>> isolate([1, -2, 3], run).parts
    [(1, [2]), (1, None), (1, [6])]
    >>> raise_located([1, -2, 3], run(([1, -2, 3],))[0], run, offset=10, total=20)
    Traceback (most recent call last):
    udf_engine.errors.RowError: negative (row 12 of the 20 rows of this call: -2)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from udf_engine.errors import ModelError, RayUDFError, RowError, remote_cause
from udf_engine.settings import NULL

# How much of a failing row the error message shows.
_ROW_PREVIEW_CHARS = 80


@dataclass
class Partial:
    """A batch's result with rows the model failed on: ``parts`` are (rows, output) runs in
    row order, output None for rows left NULL."""

    parts: list[tuple[int, Any]] = field(default_factory=list)
    error: str = ""  # what the model raised on the first NULLed row

    @property
    def nulled(self) -> int:
        return sum(rows for rows, output in self.parts if output is None)


@dataclass
class Failed:
    """The model raised on a batch."""

    error: RayUDFError


Run = Callable[[Sequence[Any]], list[Any]]  # batches -> each one's output, or Failed


def preview(row: Any) -> str:
    """A failing row as the error message shows it (cut to a readable length)."""
    text = repr(row.tolist() if hasattr(row, "tolist") else row)
    return text if len(text) <= _ROW_PREVIEW_CHARS else text[: _ROW_PREVIEW_CHARS - 3] + "..."


def user_error(err: BaseException, function: str) -> RayUDFError:
    """The exception an apply_func raised (here, or inside a worker: a RayTaskError), as a project error."""
    cause = remote_cause(err)
    if isinstance(cause, RayUDFError):
        return cause
    return ModelError(f"function {function}: the model raised {type(cause).__name__}: {cause}")


def raise_located(batch: Any, failed: Failed, run: Run, *, offset: int, total: int) -> None:
    """Raise the model's error as a RowError naming the first row of ``batch`` it fails on alone.

    ``offset`` is where ``batch`` starts among the ``total`` rows the error names its row in.
    """
    start, part, error = 0, batch, failed.error
    while len(part) > 1:
        half = len(part) // 2
        first, second = run([part[:half], part[half:]])
        if isinstance(first, Failed):
            part, error = part[:half], first.error
        elif isinstance(second, Failed):
            start, part, error = start + half, part[half:], second.error
        else:
            raise ModelError(f"{failed.error} (on a batch of {len(batch)} rows, though on no part of it alone)")
    raise RowError(str(error), row=offset + start, rows=total, values=preview(part[0]))


def isolate(batch: Any, run: Run) -> Partial:
    """Score a batch the model failed on in halves, down to the single rows it fails on."""
    if len(batch) == 1:
        (outcome,) = run([batch])
        if isinstance(outcome, Failed):
            return Partial([(1, None)], str(outcome.error))
        return Partial([(1, outcome)])
    half = len(batch) // 2
    pieces = [batch[:half], batch[half:]]
    result = Partial()
    for piece, outcome in zip(pieces, run(pieces), strict=True):
        if isinstance(outcome, Failed):
            inner = isolate(piece, run)
            result.parts.extend(inner.parts)
            result.error = result.error or inner.error
        else:
            result.parts.append((len(piece), outcome))
    return result


def resolve(batches: Sequence[Any], outcomes: Sequence[Any], run: Run, on_error: str) -> list[Any]:
    """Each batch's output, where batches the model failed on are split: ``on_error="null"``
    gives a :class:`Partial`, ``"raise"`` raises the RowError of the first failing row."""
    results = []
    offset = 0
    total = sum(len(b) for b in batches)
    for batch, outcome in zip(batches, outcomes, strict=True):
        if isinstance(outcome, Failed):
            outcome = isolate(batch, run) if on_error == NULL else raise_located(batch, outcome, run, offset=offset, total=total)
        results.append(outcome)
        offset += len(batch)
    return results
