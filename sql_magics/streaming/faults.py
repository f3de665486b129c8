"""Faults the stream tests inject: a SIGKILL at a point of a micro-batch, a read starved of file descriptors.

``RAYUDF_STREAM_CRASH="<point>:<batch>"`` kills the process at that point of that batch: a
restart with the same checkpoint must then write every input row exactly once
(tests/test_streaming_faults.py). ``RAYUDF_STREAM_READ_FAULT="<point>:<n>[,...]"`` makes the
first ``n`` reads at a read point (``always``: every one) run with no file descriptor free, so
the reader's own ``open`` fails with EMFILE and DuckDB raises what it raises in a process that
ran out: a real transient read error, which the stream must retry and never take for a bad
file. Unset, :func:`reached` and :func:`reading` cost a dict lookup.

Example:
    >>> reached("staged", 0)   # no crash asked for: nothing happens
    >>> with reading("probe"):  # no read fault asked for: the read runs as it is
    ...     pass
"""

from __future__ import annotations

import os
import resource
import signal
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

CRASH_VARIABLE = "RAYUDF_STREAM_CRASH"
POINTS = ("offsets_written", "staged", "sink_file_moved", "sink_committed", "batch_committed")
"""In a batch's order: its input recorded; its output staged; one part file of a file sink moved
into place; the sink's commit done; the batch's commit recorded."""
COMPACTION_POINTS = ("compact_written",)
"""In a checkpoint's compaction (after a batch whose commit makes it due): the compact record
written, none of the records it covers removed yet."""
READ_FAULT_VARIABLE = "RAYUDF_STREAM_READ_FAULT"
READ_POINTS = ("probe", "stage", "culprit")
"""Where a file source's files are read: a new file probed for its columns; the batch's selects
run over its files; each file read alone after a batch failed, to find the one to blame."""
ALWAYS = "always"

_starved: Counter = Counter()  # reads run starved so far, by read point (this process)


def reached(point: str, batch: int) -> None:
    """Kill this process here if the environment asks for a crash at ``point`` of batch ``batch``."""
    if os.environ.get(CRASH_VARIABLE) == f"{point}:{batch}":
        os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def reading(point: str) -> Iterator[None]:
    """Around a read of the stream's files at ``point``: starved of file descriptors if the environment asks."""
    times = _asked(point)
    if times is None or (times != ALWAYS and _starved[point] >= int(times)):
        yield
        return
    _starved[point] += 1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An open() takes the lowest free descriptor: with the limit there, no open succeeds until it is put back.
    resource.setrlimit(resource.RLIMIT_NOFILE, (_lowest_free_descriptor(), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _asked(point: str) -> str | None:
    spec = os.environ.get(READ_FAULT_VARIABLE)
    if not spec:
        return None
    for item in spec.split(","):
        name, _, times = item.strip().partition(":")
        if name == point:
            return times
    return None


def _lowest_free_descriptor() -> int:
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd
