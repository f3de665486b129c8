"""Points in a micro-batch where the fault tests kill the process: ``RAYUDF_STREAM_CRASH="<point>:<batch>"``.

A SIGKILL at each point, then a restart with the same checkpoint, must write every input row
exactly once (tests/test_streaming_faults.py). Unset, :func:`reached` costs a dict lookup.

Example:
    >>> reached("staged", 0)   # no crash asked for: nothing happens
"""

from __future__ import annotations

import os
import signal

CRASH_VARIABLE = "RAYUDF_STREAM_CRASH"
POINTS = ("offsets_written", "staged", "sink_file_moved", "sink_committed", "batch_committed")
"""In a batch's order: its input recorded; its output staged; one part file of a file sink moved
into place; the sink's commit done; the batch's commit recorded."""


def reached(point: str, batch: int) -> None:
    """Kill this process here if the environment asks for a crash at ``point`` of batch ``batch``."""
    if os.environ.get(CRASH_VARIABLE) == f"{point}:{batch}":
        os.kill(os.getpid(), signal.SIGKILL)
