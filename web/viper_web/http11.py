"""uvicorn's HTTP/1.1 protocol (h11) with a deadline on each request's headers.

uvicorn's keep-alive timer restarts on every byte received, so a client sending its headers a byte at a
time holds a connection forever. Here a connection whose next request has not started (its headers
complete) within the deadline is closed: at connect, and again after each response. The latter also bounds
how long the rest of a refused request's body is read and dropped (nginx's lingering close).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


class _HeaderDeadlineProtocol(H11Protocol):
    header_timeout = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm(None)

    def on_response_complete(self) -> None:
        finished = self.cycle  # a pipelined request may start within the call below
        super().on_response_complete()
        self._arm(finished)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        super().connection_lost(exc)

    def _arm(self, previous: object) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._expire, previous)

    def _expire(self, previous: object) -> None:
        if self.cycle is previous and not self.transport.is_closing():
            self.transport.close()  # no new request within the deadline


def h11_protocol(header_timeout: float) -> type[H11Protocol]:
    """The protocol class for uvicorn.Config(http=...)."""
    return type("HeaderDeadlineH11Protocol", (_HeaderDeadlineProtocol,), {"header_timeout": header_timeout})
