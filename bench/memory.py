"""Peak resident memory of a set of processes, sampled on a background thread.

Example:
    >>> import os
    >>> with PeakRSS({"driver": os.getpid()}) as peaks:
    ...     data = bytearray(50 << 20)
    >>> peaks.peak_mb["driver"] > 50
    True
"""

from __future__ import annotations

import threading

import psutil

# Fine enough to catch a batch-sized spike, coarse enough to cost nothing.
_SAMPLE_S = 0.05


class PeakRSS:
    """Samples the RSS of named processes until the ``with`` block ends."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak_mb = {name: 0.0 for name in pids}  # peak RSS seen, MiB
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            for name, proc in self._procs.items():
                try:
                    self.peak_mb[name] = max(self.peak_mb[name], proc.memory_info().rss / 2**20)
                except psutil.Error:
                    pass
            if self._stop.wait(_SAMPLE_S):
                return

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
