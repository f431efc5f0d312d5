"""ByteLRU, a thread-safe LRU bounded by its size in bytes: the one kind of cache under the processed inputs
(engine/preprocessing.py), the vision features and the metric's prefixes (models/). No torch, so that the
engine's preprocessing side needs none."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    bytes: int
    entries: int


class ByteLRU(Generic[K, V]):
    """Maps keys to immutable values (users build their own objects around them), evicting the least recently
    used beyond capacity_bytes, each value weighing size_of(value) bytes."""

    def __init__(self, capacity_bytes: int, size_of: Callable[[V], int]):
        self.capacity_bytes = capacity_bytes
        self._size_of = size_of
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self._misses += 1
                return None
            self._hits += 1
            self._entries.move_to_end(key)
            return value

    def __contains__(self, key: K) -> bool:
        """Whether key is cached, without counting a hit or a miss or refreshing its recency."""
        with self._lock:
            return key in self._entries

    def put(self, key: K, value: V) -> bool:
        """Stores value, evicting least recently used entries; False, storing nothing, when it alone is larger
        than the capacity."""
        with self._lock:
            return self._put(key, value)

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(hits=self._hits, misses=self._misses, bytes=self._bytes, entries=len(self._entries))

    def _put(self, key: K, value: V) -> bool:
        """put, with the lock held."""
        size = self._size_of(value)
        self._discard(key)
        if size > self.capacity_bytes:
            return False
        self._entries[key] = value
        self._bytes += size
        while self._bytes > self.capacity_bytes:
            self._discard(next(iter(self._entries)))
        return True

    def _discard(self, key: K) -> None:
        value = self._entries.pop(key, None)
        if value is not None:
            self._bytes -= self._size_of(value)
