"""What the benches watch while they run: a sampler thread (the server's memory, the GPU's)."""

from __future__ import annotations

import threading


class Sampler:
    """Calls sample() at once and then every `every` seconds on a thread of its own, from entering the context
    until leaving it."""

    every = 1.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.every):
                return
