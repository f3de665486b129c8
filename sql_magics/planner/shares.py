"""Cutting Parquet files into shares of whole row groups: what one worker call reads and scores.

Files with fewer row groups than there are workers are cut inside their row groups, so that
every worker scores a part: each part's worker decodes the whole row group and keeps its rows.

Example:
    >>> import pyarrow as pa, pyarrow.parquet as pq, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "t.parquet")
    >>> pq.write_table(pa.table({"x": range(10_000)}), path, row_group_size=1000)
    >>> [(s.first, s.last) for s in shares_of([path], workers=2)][:3]   # ~10,000 / (2 x 4) rows: two row groups each
    [(0, 1999), (2000, 3999), (4000, 5999)]
    >>> pq.write_table(pa.table({"x": range(10_000)}), path)            # one row group
    >>> [(s.first, s.last) for s in shares_of([path], workers=2)]
    [(0, 4999), (5000, 9999)]
"""

from __future__ import annotations

import functools
import os
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
# A row group is cut (when there are fewer than workers) only into parts of at least this many rows:
# below it, decoding the group again costs more than the other worker's help saves.
MIN_PART_ROWS = 1024


@dataclass
class Share:
    """Rows ``first`` to ``last`` (file row numbers, both included) of one file: whole row groups, or part of one."""

    file: str
    first: int
    last: int

    @property
    def rows(self) -> int:
        return self.last - self.first + 1


def shares_of(files: list[str], workers: int) -> list[Share]:
    """Whole row groups of each file (parts of them when there are fewer than ``workers``), gathered into
    shares of about total / (workers * SHARES_PER_WORKER) rows, at most MAX_SHARE_ROWS."""
    groups = [list(row_groups(file)) for file in files]
    total = sum(sum(g) for g in groups)
    if 0 < (count := sum(len(g) for g in groups)) < workers:
        groups = [[part for size in sizes for part in _parts(size, -(-workers // count))] for sizes in groups]
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


def row_groups(file: str) -> tuple[int, ...]:
    """The rows of each row group of ``file``, its footer read once per (path, size, modification time)."""
    stat = os.stat(file)
    return _footer_row_groups(file, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _footer_row_groups(file: str, size: int, mtime_ns: int) -> tuple[int, ...]:
    meta = pq.read_metadata(file)
    return tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))


def _parts(rows: int, parts: int) -> list[int]:
    """``rows`` cut into ``parts`` near-equal sizes, none under MIN_PART_ROWS (fewer parts if need be)."""
    parts = max(1, min(parts, rows // MIN_PART_ROWS))
    return [rows // parts + (i < rows % parts) for i in range(parts)]
