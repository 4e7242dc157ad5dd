"""Wall time and peak resident memory of a block of work, sampled from /proc."""

from __future__ import annotations

import os
import resource
import threading
import time
from dataclasses import dataclass


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the process-lifetime peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Measurement:
    wall_s: float = 0.0
    peak_rss_bytes: int = 0


class measure:
    """`with measure() as m: ...` → m.wall_s, m.peak_rss_bytes (peak within the block).

    A sampling thread reads RSS every `interval` seconds; ru_maxrss cannot be reset, so it
    would report the peak of everything the process did before the block too.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.result = Measurement()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.result.peak_rss_bytes = max(self.result.peak_rss_bytes, current_rss_bytes())

    def __enter__(self) -> Measurement:
        self._start = time.perf_counter()
        self.result.peak_rss_bytes = current_rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self.result

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.result.peak_rss_bytes = max(self.result.peak_rss_bytes, current_rss_bytes())
        self.result.wall_s = time.perf_counter() - self._start
