"""The engine's errors, in a torch-free module so the RPC layer can map them to status codes."""


class ModelsNotReady(Exception):
    """Models are still loading (or failed to load)."""


class StoredImageUnreadable(Exception):
    """A stored image could not be decoded: the store holds something the server cannot read (a server fault)."""


class ContextChanged(Exception):
    """The profile's images changed between the read of its row and the read of their bytes: retry the call."""


class QueueFull(Exception):
    """A model's queue is at capacity; the caller should retry later."""

    def __init__(self, model: str, depth: int) -> None:
        super().__init__(f"{model} queue is full ({depth} requests waiting); retry later")
        self.depth = depth


class WorkerClosed(Exception):
    """The model's scheduler is shutting down and takes no new requests."""


class PreprocessWorkerLost(Exception):
    """An image preprocessing worker died holding one of the request's images (it has been replaced): retry."""
