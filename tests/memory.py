"""The resident memory of a process, sampled while a block runs (for the resource-safety tests)."""

from __future__ import annotations

import threading
import time

import psutil

MB = 1_000_000


class PeakMemory:
    """Samples a process's resident set every few milliseconds while the block runs; growth = peak - before."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._done = threading.Event()
        self.before = self.peak = 0

    def __enter__(self) -> PeakMemory:
        self.before = self.peak = self._process.memory_info().rss
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        self._sampler.join()

    @property
    def growth(self) -> int:
        return self.peak - self.before

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.005)
