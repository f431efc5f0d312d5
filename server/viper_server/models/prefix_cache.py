"""A thread-safe LRU of prompt prefixes' key/value states, bounded by their size in bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

# Per decoder layer: (keys, values), each [batch=1, kv_heads, prefix_len, head_dim].
KVLayers = tuple[tuple[torch.Tensor, torch.Tensor], ...]


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    bytes: int
    entries: int


def kv_bytes(layers: KVLayers) -> int:
    return sum(tensor.numel() * tensor.element_size() for layer in layers for tensor in layer)


class PrefixCache:
    """Maps a key whose first element is a user id, e.g. (user_id, context digest), to KV states.

    Entries are never mutated: users of an entry build their own cache object around its tensors.
    Per user it remembers the newest profile version it was told about (invalidate), and refuses entries
    computed from an older snapshot: a Score that read the profile before an update cannot cache it after.
    """

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[Sequence[Hashable], KVLayers] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._newest_version: dict[str, int] = {}
        self._lock = threading.Lock()

    def get(self, key: Sequence[Hashable]) -> KVLayers | None:
        with self._lock:
            layers = self._entries.get(key)
            if layers is None:
                self._misses += 1
                return None
            self._hits += 1
            self._entries.move_to_end(key)
            return layers

    def __contains__(self, key: Sequence[Hashable]) -> bool:
        """Whether key is cached, without counting a hit or a miss or refreshing its recency."""
        with self._lock:
            return key in self._entries

    def put(self, key: Sequence[Hashable], layers: KVLayers, *, version: int = 0) -> bool:
        """Stores `layers`, computed from profile `version`, evicting least recently used entries.

        Returns False, storing nothing, for an entry larger than the capacity or from a snapshot older than
        the newest version invalidate() was given for the user."""
        size = kv_bytes(layers)
        with self._lock:
            if version < self._newest_version.get(key[0], 0):
                return False
            self._discard(key)
            if size > self.capacity_bytes:
                return False
            self._entries[key] = layers
            self._bytes += size
            while self._bytes > self.capacity_bytes:
                self._discard(next(iter(self._entries)))
            return True

    def invalidate(self, user_id: str, version: int = 0) -> int:
        """Drops every entry of `user_id`, whose profile is now at `version`; returns how many there were."""
        with self._lock:
            self._newest_version[user_id] = max(version, self._newest_version.get(user_id, 0))
            keys = [key for key in self._entries if key[0] == user_id]
            for key in keys:
                self._discard(key)
            return len(keys)

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(hits=self._hits, misses=self._misses, bytes=self._bytes, entries=len(self._entries))

    def _discard(self, key: Sequence[Hashable]) -> None:
        layers = self._entries.pop(key, None)
        if layers is not None:
            self._bytes -= kv_bytes(layers)
