"""Token-aware batching: rows of text grouped by length under a budget of padded tokens.

A transformer pads every row of a batch to the batch's longest row, so a batch of one long
text and thirty short ones costs thirty-one long rows. Sorting the rows of a worker's call by
token count and cutting them where ``rows x longest`` would pass ``max_batch_tokens`` pads
each batch only to its own longest row; the caller puts the outputs back in row order.

Example:
    >>> [group.tolist() for group in token_batches([5, 40, 6, 38, 7], max_batch_tokens=80)]
    [[1, 3], [4, 2, 0]]
    >>> [group.tolist() for group in token_batches([5, 40, 6, 38, 7], max_batch_tokens=80, ascending=True)]
    [[0, 2, 4], [3, 1]]
    >>> padding_share([5, 40, 6, 38, 7], [[0, 2, 4], [3, 1]])
    0.052083
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def token_batches(lengths: Sequence[int], max_batch_tokens: int, *, ascending: bool = False) -> list[np.ndarray]:
    """Row indices in groups, longest rows first (so a batch too big for memory fails first; ``ascending``:
    shortest first): each group's rows times its longest row stays within ``max_batch_tokens`` (a row
    longer than that goes alone)."""
    order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
    if not ascending:
        order = order[::-1]
    groups: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = 0
        stop = start
        while stop < len(order):
            longest_then = max(longest, int(lengths[order[stop]]))
            if stop > start and longest_then * (stop - start + 1) > max_batch_tokens:
                break
            longest, stop = longest_then, stop + 1
        groups.append(order[start:stop])
        start = stop
    return groups


def padding_share(lengths: Sequence[int], groups: Sequence[Sequence[int]]) -> float:
    """Padded tokens over real tokens when each group is padded to its longest row."""
    real = sum(int(n) for n in lengths)
    padded = sum(len(group) * max(int(lengths[i]) for i in group) for group in groups if len(group))
    return round((padded - real) / real, 6) if real else 0.0
