"""The input work of the models, off the server's process: image bytes -> pixel values in worker processes.

Decoding, transparency, resizing and IDEFICS2's image processor (pixels.py) are CPU work that would
otherwise hold the GIL beside the scheduler thread that drives the models. A Preprocessor runs it in
`workers` processes of their own (0: in the calling thread, for tests and debugging), one image per job, and
keeps what they made in a content-keyed LRU cache (the image's sha256 and the processor's settings), within
a byte budget: the same image uploaded again, a stored image read again, is not decoded again.

The workers are plain subprocesses (`python -m viper_server.engine.preprocessing`), not multiprocessing ones:
a spawned multiprocessing child would import the server's main module (and torch) first. They import PIL,
numpy and pixels.py only, talk over two pipes (pickled requests; a reply is a small pickled header, then the
array's raw bytes, read straight into the array that keeps them: one copy in this process), ignore SIGINT
and exit when their request pipe closes: when the server closes them, and when it dies, even of SIGKILL.
A worker that dies is replaced; the job it held fails with PreprocessWorkerLost (UNAVAILABLE), the others
go on.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np
from PIL import Image

from ..imaging import ImageDecodeError
from ..lru import ByteLRU
from ..pixels import SETTINGS_KEY, ProcessedImage, process_bytes, process_rgb
from .errors import PreprocessWorkerLost, WorkerClosed

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 256 << 20
# How long a closing worker gets to exit on its own before it is killed.
_EXIT_SECONDS = 5.0


def available_cores() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """Half the cores this process may use (1 on 2 cores), at most 8: the other half drives the models."""
    return max(1, min(8, available_cores() // 2))


# An image to process: ("bytes", encoded bytes) or ("rgb", an RGB uint8 array [H, W, 3]).
Job = tuple[str, object]


def run_job(job: Job, max_pixels: int) -> np.ndarray:
    """What a worker does with one job (also the in-process path); ImageDecodeError for bad bytes."""
    kind, payload = job
    if kind == "bytes":
        return process_bytes(payload, max_pixels=max_pixels)
    if kind == "rgb":
        return process_rgb(Image.fromarray(payload, "RGB"))
    raise ValueError(f"unknown preprocessing job {kind!r}")


def cache_key(sha256: str) -> str:
    """The processed-input cache's key of an image: its bytes' sha256 and everything that shapes the pixels."""
    return f"{sha256}/{SETTINGS_KEY}"


class ProcessedCache(ByteLRU[str, ProcessedImage]):
    """Processed images by key, least recently used dropped first beyond max_bytes. Safe from any thread."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes, lambda image: image.nbytes)

    @property
    def max_bytes(self) -> int:
        return self.capacity_bytes


@dataclass(frozen=True)
class PoolStats:
    workers: int  # worker processes running now
    in_flight: int  # jobs a worker holds
    restarts: int  # workers replaced after they died


class Preprocessor:
    """Turns images into ProcessedImages in worker processes (workers=0: in the calling thread), through the
    cache. Items come back in order, each a ProcessedImage or the ImageDecodeError of its bytes."""

    def __init__(self, workers: int, *, max_pixels: int, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if workers < 0 or cache_bytes < 0:
            raise ValueError(f"workers and cache_bytes must not be negative, got {workers} and {cache_bytes}")
        self.max_pixels = max_pixels
        self.cache = ProcessedCache(cache_bytes)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._in_flight = self._restarts = 0
        self._workers = [_Worker(self, index) for index in range(workers)]
        for worker in self._workers:
            worker.start()

    @property
    def workers(self) -> int:
        return len(self._workers)

    @property
    def pool_stats(self) -> PoolStats:
        alive = sum(worker.alive for worker in self._workers)
        with self._lock:
            return PoolStats(alive, self._in_flight, self._restarts)

    def worker_pids(self) -> list[int]:
        return [worker.pid for worker in self._workers if worker.pid is not None]

    # -- the callers' side --------------------------------------------------------------------------------

    def process_uploads(self, uploads: Sequence[bytes]) -> list[ProcessedImage | ImageDecodeError]:
        """Uploaded images (blocking: from a handler's thread), keyed by the sha256 of their bytes. The list ends
        at the first bad one: a request is refused for it, so the images after it are not processed (their
        jobs are dropped unless a worker has begun them)."""
        return self.process([(hashlib.sha256(data).hexdigest(), ("bytes", data)) for data in uploads])

    def process(self, items: Sequence[tuple[str | None, Job]]) -> list[ProcessedImage | ImageDecodeError]:
        """(sha256 of the source or None, job) per image -> its result, blocking until all are done; the list
        ends at the first ImageDecodeError, the later items' jobs dropped unless a worker has begun them."""
        started = self._start(items)
        results: list[ProcessedImage | ImageDecodeError] = []
        for (key, _), item in zip(items, started):
            results.append(self._finish(key, item.result()) if isinstance(item, Future) else item)
            if isinstance(results[-1], ImageDecodeError):
                for rest in started[len(results):]:
                    if isinstance(rest, Future):
                        rest.cancel()
                break
        return results

    async def process_async(self, items: Sequence[tuple[str | None, Job]]) -> list[ProcessedImage | ImageDecodeError]:
        """process, awaited: the event loop stays free while the workers (or a thread) work."""
        if not self._workers:
            return await asyncio.to_thread(self.process, items)
        started = self._start(items)
        results = []
        for (key, _), item in zip(items, started):
            results.append(self._finish(key, await asyncio.wrap_future(item)) if isinstance(item, Future) else item)
        return results

    def close(self) -> None:
        """Stops the workers (a job they hold fails with WorkerClosed); idempotent."""
        self._closed = True
        for _ in self._workers:
            self._jobs.put(None)
        for worker in self._workers:
            worker.stop()

    # -- internals ----------------------------------------------------------------------------------------

    def _start(self, items: Sequence[tuple[str | None, Job]]) -> list[ProcessedImage | Future]:
        """Cache hits as they are; the others as futures (done at once in process, else queued to the workers)."""
        if self._closed:
            raise WorkerClosed("the server is shutting down")
        started: list[ProcessedImage | Future] = []
        pending: dict[str, Future] = {}  # an image given twice is processed once
        for key, job in items:
            if key in pending:
                started.append(pending[key])
                continue
            cached = self.cache.get(cache_key(key)) if key is not None else None
            if cached is not None:
                started.append(cached)
                continue
            future: Future = Future()
            if key is not None:
                pending[key] = future
            if self._workers:
                self._jobs.put((job, future))
            else:
                future.set_running_or_notify_cancel()
                try:
                    future.set_result(("ok", run_job(job, self.max_pixels)))
                except ImageDecodeError as exc:
                    future.set_result(("error", str(exc)))
            started.append(future)
        return started

    def _finish(self, key: str | None, reply: tuple[str, object]) -> ProcessedImage | ImageDecodeError:
        status, value = reply
        if status == "error":
            return ImageDecodeError(value)
        value.flags.writeable = False  # shared through the cache: nobody writes into it
        image = ProcessedImage(value, sha256=key)
        if key is not None:
            self.cache.put(cache_key(key), image)
        return image

    def _counted(self, change: int, restarted: bool = False) -> None:
        with self._lock:
            self._in_flight += change
            self._restarts += restarted


class _Worker:
    """One worker process and the thread of this process that hands it jobs, one at a time."""

    def __init__(self, pool: Preprocessor, index: int) -> None:
        self._pool = pool
        self._index = index
        self._process: subprocess.Popen | None = None
        self._requests: Connection | None = None
        self._replies: Connection | None = None
        self._raw_replies: io.FileIO | None = None
        self._spawning = threading.Lock()  # a replacement is never started once stop has begun
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, name=f"preprocess-{index}", daemon=True)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def stop(self) -> None:
        """Closes the request pipe (the worker exits on its own), then waits; kills it if it does not."""
        with self._spawning:
            self._stopped = True
            process, requests = self._process, self._requests
        if requests is not None:
            requests.close()
        if process is not None:
            try:
                process.wait(_EXIT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._replies is not None:
            self._replies.close()

    def _spawn(self) -> None:
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(request_read), str(reply_write), str(self._pool.max_pixels)],
                pass_fds=(request_read, reply_write), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            )
        finally:
            os.close(request_read)
            os.close(reply_write)
        self._requests = Connection(request_write, readable=False)
        self._replies = Connection(reply_read, writable=False)
        self._raw_replies = io.FileIO(reply_read, "rb", closefd=False)

    def _serve(self) -> None:
        while (item := self._pool._jobs.get()) is not None:
            job, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                self._run(job, future)
            except Exception as exc:  # e.g. no replacement could be started: the job fails, the thread goes on
                log.exception("image preprocessing worker %d failed", self._index)
                if not future.done():
                    future.set_exception(exc)

    def _run(self, job: Job, future: Future) -> None:
        pool = self._pool
        if pool._closed:
            future.set_exception(WorkerClosed("the server is shutting down"))
            return
        if not self.alive:  # died while idle: replaced before it is handed the job
            self._replace("while idle")
        pool._counted(+1)
        try:
            self._requests.send(job)
            reply = self._receive()
        except (EOFError, OSError) as exc:
            if pool._closed:
                future.set_exception(WorkerClosed("the server is shutting down"))
                return
            future.set_exception(PreprocessWorkerLost(
                "an image preprocessing worker stopped while processing this request's images; it has been "
                "replaced: retry"))
            self._replace(f"during a job ({type(exc).__name__})")
            return
        finally:
            pool._counted(-1)
        if reply[0] == "crash":
            future.set_exception(RuntimeError(f"image preprocessing failed in a worker: {reply[1]}"))
        else:
            future.set_result(reply)

    def _receive(self) -> tuple[str, object]:
        """A worker's reply; an array's bytes read into the array itself (the GIL released while reading)."""
        reply = self._replies.recv()
        if reply[0] != "ok":
            return reply
        values = np.empty(reply[1], dtype=np.float32)
        view, position = memoryview(values).cast("B"), 0
        while position < len(view):
            read = self._raw_replies.readinto(view[position:])
            if not read:
                raise EOFError("the worker's reply ended early")
            position += read
        return "ok", values

    def _replace(self, when: str) -> None:
        old = self._process
        code = old.wait() if old is not None else None
        log.warning("image preprocessing worker %d (pid %s) exited %s with code %s; starting another",
                    self._index, old.pid if old is not None else None, when, code)
        with self._spawning:
            if self._stopped:
                return
            self._requests.close()
            self._replies.close()
            self._spawn()
        self._pool._counted(0, restarted=True)


# -- the worker process -----------------------------------------------------------------------------------


def _worker_main(request_fd: int, reply_fd: int, max_pixels: int) -> None:
    """Answers jobs until the request pipe closes: ("ok", pixel values), ("error", why the bytes are no image)
    or ("crash", the exception's type): never the bytes or the pixels in a message."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server closes us
    requests = Connection(request_fd, writable=False)
    replies = Connection(reply_fd, readable=False)
    while True:
        try:
            job = requests.recv()
        except EOFError:
            return
        values = None
        try:
            values = np.ascontiguousarray(run_job(job, max_pixels), dtype=np.float32)
            reply = ("ok", values.shape)
        except ImageDecodeError as exc:
            reply = ("error", str(exc))
        except Exception as exc:  # noqa: BLE001 - reported to the server, which fails the request
            reply = ("crash", type(exc).__name__)
        try:
            replies.send(reply)
            if values is not None:  # then the pixels, unpickled: the server reads them into their array
                view = memoryview(values).cast("B")
                while view:
                    view = view[os.write(reply_fd, view):]
        except OSError:  # the server is gone
            return


if __name__ == "__main__":
    _worker_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
