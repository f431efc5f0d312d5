"""PrefixCache: prompt prefixes' key/value states in a ByteLRU (per user, refusing entries older than the user's
newest profile version)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from ..lru import ByteLRU, CacheStats

__all__ = ["ByteLRU", "CacheStats", "KVLayers", "PrefixCache", "kv_bytes"]

# Per decoder layer: (keys, values), each [batch=1, kv_heads, prefix_len, head_dim].
KVLayers = tuple[tuple[torch.Tensor, torch.Tensor], ...]


def kv_bytes(layers: KVLayers) -> int:
    return sum(tensor.numel() * tensor.element_size() for layer in layers for tensor in layer)


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
