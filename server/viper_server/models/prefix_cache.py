"""Thread-safe LRUs bounded by their size in bytes: ByteLRU, and PrefixCache for prompt prefixes' key/value
states (per user, refusing entries older than the user's newest profile version)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

# Per decoder layer: (keys, values), each [batch=1, kv_heads, prefix_len, head_dim].
KVLayers = tuple[tuple[torch.Tensor, torch.Tensor], ...]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    bytes: int
    entries: int


def kv_bytes(layers: KVLayers) -> int:
    return sum(tensor.numel() * tensor.element_size() for layer in layers for tensor in layer)


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


class PrefixCache(ByteLRU[Sequence[Hashable], KVLayers]):
    """Maps a key whose first element is a user id, e.g. (user_id, context digest), to KV states.

    Entries are never mutated: users of an entry build their own cache object around its tensors.
    Per user it remembers the newest profile version it was told about (invalidate), and refuses entries
    computed from an older snapshot: a Score that read the profile before an update cannot cache it after.
    """

    def __init__(self, capacity_bytes: int):
        super().__init__(capacity_bytes, kv_bytes)
        self._newest_version: dict[str, int] = {}

    def put(self, key: Sequence[Hashable], layers: KVLayers, *, version: int = 0) -> bool:
        """Stores `layers`, computed from profile `version`, evicting least recently used entries.

        Returns False, storing nothing, for an entry larger than the capacity or from a snapshot older than
        the newest version invalidate() was given for the user."""
        with self._lock:
            if version < self._newest_version.get(key[0], 0):
                return False
            return self._put(key, layers)

    def invalidate(self, user_id: str, version: int = 0) -> int:
        """Drops every entry of `user_id`, whose profile is now at `version`; returns how many there were."""
        with self._lock:
            self._newest_version[user_id] = max(version, self._newest_version.get(user_id, 0))
            keys = [key for key in self._entries if key[0] == user_id]
            for key in keys:
                self._discard(key)
            return len(keys)
