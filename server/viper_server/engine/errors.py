"""The engine's errors, in a torch-free module so the RPC layer can map them to status codes."""


class ModelsNotReady(Exception):
    """Models are still loading (or failed to load)."""


class StoredImageUnreadable(Exception):
    """A stored image could not be decoded: the store holds something the server cannot read (a server fault)."""
