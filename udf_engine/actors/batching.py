"""How rows become a worker's batches, and how many batches one worker holds: the one place for both.

Every caller scores a feature matrix through the engine (``RemoteUDF.score``, the worker's own
share scans): :func:`cut` makes its ``batch_size`` pieces. A worker holds at most
:data:`MAX_IN_FLIGHT_PER_WORKER` batches at once, whoever sent them (the session's SQL, each
Serve replica, a share scan): each caller's dispatcher keeps to that bound for its own batches,
and the worker answers :data:`BUSY` to one more, which its dispatcher then sends elsewhere or later.

Example:
    >>> import numpy as np
    >>> [len(piece) for piece in cut(np.zeros((5, 2)), 2)]
    [2, 2, 1]
"""

from __future__ import annotations

from typing import Any

import numpy as np

# One batch running and one queued behind it: the worker starts the next batch the moment it
# finishes one, without waiting a round trip for it, while a slow worker never hoards more than
# one batch that a faster worker could have taken.
MAX_IN_FLIGHT_PER_WORKER = 2
# Calls a worker takes in at once to count them (beyond MAX_IN_FLIGHT_PER_WORKER it answers BUSY at
# once): more than any number of callers' dispatchers can have in flight to it (each keeps to the bound).
CALLS_SEEN = 32
# A call of texts is cut in at least this many pieces of about equal characters: enough for a few
# workers to share a long-tailed call evenly, few enough that each piece still fills the model's batches.
TEXT_PIECES = 8
# ... but a piece of fewer characters than this (~1,000 tokens: milliseconds on a model, less than
# the round trip to a worker) is not cut: a served request's few texts go as one batch.
TEXT_PIECE_MIN_CHARS = 4096


class _Busy:
    """What a worker answers a batch beyond its bound: not a result; the caller sends the batch again."""

    def __repr__(self) -> str:
        return "BUSY"

    def __reduce__(self) -> str:
        return "BUSY"  # one object, in every process


BUSY = _Busy()


def cut(matrix: Any, rows: int) -> list[Any]:
    """``matrix`` (anything sliceable by rows) in pieces of at most ``rows`` rows, in order. Texts or
    bytes (a 1-D object array), or prompt rows (a 2-D object array: the prompt first), are cut where a
    piece reaches :data:`TEXT_PIECES`' share of the characters as well: a long text is many times a
    short one's work, so equal rows are unequal work.

    Example:
        >>> texts = np.array(["x" * 6000, "x" * 3000, "x" * 500, "x" * 300, "x", "x"], dtype=object)
        >>> [len(piece) for piece in cut(texts, 4)]
        [1, 4, 1]
        >>> [len(piece) for piece in cut(texts[2:], 4)]   # under TEXT_PIECE_MIN_CHARS: by rows alone
        [4]
    """
    if not (isinstance(matrix, np.ndarray) and matrix.ndim in (1, 2) and matrix.dtype == object):
        return [matrix[i : i + rows] for i in range(0, len(matrix), rows)]
    texts = matrix if matrix.ndim == 1 else matrix[:, 0]
    lengths = np.fromiter((len(value) if isinstance(value, str | bytes) else 1 for value in texts), np.int64, len(matrix))
    budget = max(TEXT_PIECE_MIN_CHARS, int(lengths.sum()) // TEXT_PIECES)
    pieces, start, size = [], 0, 0
    for stop, length in enumerate(lengths, 1):
        size += int(length)
        if stop - start == rows or size >= budget:
            pieces.append(matrix[start:stop])
            start, size = stop, 0
    if start < len(matrix):
        pieces.append(matrix[start:])
    return pieces
