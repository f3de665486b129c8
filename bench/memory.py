"""Peak resident memory of a set of processes, sampled on a background thread.

Both RSS and private memory (RSS less shared pages) are kept: a Ray driver's RSS also
counts the object-store pages it wrote batches into, which belong to the store.

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
        self.peak_private_mb = {name: 0.0 for name in pids}  # peak RSS less shared pages, MiB
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            for name, proc in self._procs.items():
                try:
                    info = proc.memory_info()
                    self.peak_mb[name] = max(self.peak_mb[name], info.rss / 2**20)
                    self.peak_private_mb[name] = max(self.peak_private_mb[name], (info.rss - info.shared) / 2**20)
                except psutil.Error:
                    pass
            if self._stop.wait(_SAMPLE_S):
                return

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
