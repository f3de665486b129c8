"""Cutting Parquet files into shares of whole row groups: what one worker call reads and scores.

Example:
    >>> import pyarrow as pa, pyarrow.parquet as pq, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "t.parquet")
    >>> pq.write_table(pa.table({"x": range(10_000)}), path, row_group_size=1000)
    >>> [(s.first, s.last) for s in shares_of([path], workers=2)][:3]   # ~10,000 / (2 x 4) rows: two row groups each
    [(0, 1999), (2000, 3999), (4000, 5999)]
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.parquet as pq

# Shares per worker when the row groups allow: enough that a fast worker takes a slow one's
# work and each worker has its next share queued, few enough that a share's fixed cost
# (a call, a DuckDB query) stays small next to scoring its rows.
SHARES_PER_WORKER = 4
# And no bigger than this (unless one row group is): a worker lost mid-share costs at most this
# much work again, and a share is short enough not to be caught by one worker death after another
# (each death counts against the share running on it, as against a batch: max_retries).
MAX_SHARE_ROWS = 8192


@dataclass
class Share:
    """Rows ``first`` to ``last`` (file row numbers, both included) of one file: whole row groups."""

    file: str
    first: int
    last: int

    @property
    def rows(self) -> int:
        return self.last - self.first + 1


def shares_of(files: list[str], workers: int) -> list[Share]:
    """Whole row groups of each file, gathered into shares of about total / (workers * SHARES_PER_WORKER) rows, at most MAX_SHARE_ROWS."""
    groups = []
    for file in files:
        meta = pq.read_metadata(file)
        groups.append([meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    total = sum(sum(g) for g in groups)
    target = max(1, min(MAX_SHARE_ROWS, total // max(1, workers * SHARES_PER_WORKER)))
    shares = []
    for file, sizes in zip(files, groups, strict=True):
        start = rows = 0
        for size in sizes:
            rows += size
            if rows - start >= target:
                shares.append(Share(file, start, rows - 1))
                start = rows
        if rows > start:
            shares.append(Share(file, start, rows - 1))
    return shares
