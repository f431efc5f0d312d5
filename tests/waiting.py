"""Waiting in tests on a condition, never a fixed pause."""

import time


def wait_for(condition, timeout: float) -> None:
    """Returns once condition() is true; AssertionError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not hold in time")
        time.sleep(0.01)
