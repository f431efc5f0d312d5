"""What the interceptor learned about the call under way, for the servicers: a context variable per call.

The servicers read the authenticated Caller from here (a plain value, handed on to the application) and
count the items a call produced, for its audit record.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from ..access import Caller


@dataclass
class CallState:
    caller: Caller | None = None  # None: an open method (health)
    items: int = 0  # images generated, queries scored


_CALL: ContextVar[CallState] = ContextVar("viper_call")


def bind_call(state: CallState) -> None:
    _CALL.set(state)


def current_caller() -> Caller:
    """The authenticated caller of the RPC being handled (the interceptor refuses calls without one)."""
    caller = _CALL.get().caller
    if caller is None:
        raise RuntimeError("no authenticated caller: the interceptor did not run for this call")
    return caller


def count_items(count: int = 1) -> None:
    _CALL.get().items += count
