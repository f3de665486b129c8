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

# One batch running and one queued behind it: the worker starts the next batch the moment it
# finishes one, without waiting a round trip for it, while a slow worker never hoards more than
# one batch that a faster worker could have taken.
MAX_IN_FLIGHT_PER_WORKER = 2
# Calls a worker takes in at once to count them (beyond MAX_IN_FLIGHT_PER_WORKER it answers BUSY at
# once): more than any number of callers' dispatchers can have in flight to it (each keeps to the bound).
CALLS_SEEN = 32


class _Busy:
    """What a worker answers a batch beyond its bound: not a result; the caller sends the batch again."""

    def __repr__(self) -> str:
        return "BUSY"

    def __reduce__(self) -> str:
        return "BUSY"  # one object, in every process


BUSY = _Busy()


def cut(matrix: Any, rows: int) -> list[Any]:
    """``matrix`` (anything sliceable by rows) in pieces of ``rows`` rows, in order."""
    return [matrix[i : i + rows] for i in range(0, len(matrix), rows)]
