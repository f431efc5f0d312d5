"""One call forwarded to a gRPC back end, its answer written through the caller's protocol as it comes.

Cancelling the task that runs forward() cancels the back-end call: that is how a closed HTTP request
or a browser's abort reaches the server (a generation stops within one denoising step).
"""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio

from .backends import Backend, Backends
from .codes import RpcError
from .exchange import Exchange, Metadata
from .registry import Method


class Outcome:
    """What the access log says about a call."""

    def __init__(self) -> None:
        self.code = grpc.StatusCode.OK
        self.backend = "-"


async def forward(method: Method, wire: bytes, user_id: str, metadata: Metadata, timeout: float | None,
                  backends: Backends, exchange: Exchange, outcome: Outcome) -> None:
    candidates = backends.order(user_id)
    if not method.read_only:
        candidates = candidates[:1]  # a write is never sent twice
    for attempt, backend in enumerate(candidates, start=1):
        outcome.backend = backend.target
        try:
            if method.server_streaming:
                await _stream(backend, method, wire, metadata, timeout, exchange)
            else:
                await _unary(backend, method, wire, metadata, timeout, exchange)
            return
        except _Unanswered as unanswered:
            # This back end is down or draining and answered nothing: a read-only call tries the next one.
            if attempt == len(candidates):
                outcome.code = unanswered.error.code
                await exchange.finish(unanswered.error, ())
                return
        except RpcError as error:
            outcome.code = error.code
            await exchange.finish(error, ())
            return


class _Unanswered(Exception):
    def __init__(self, error: RpcError) -> None:
        self.error = error


def _error(exc: grpc.aio.AioRpcError) -> RpcError:
    return RpcError(exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ()))


async def _unary(backend: Backend, method: Method, wire: bytes, metadata: Metadata, timeout: float | None,
                 exchange: Exchange) -> None:
    call = backend.unary_unary(method.path)(wire, metadata=metadata, timeout=timeout)
    try:
        response = await call
    except grpc.aio.AioRpcError as exc:
        if exc.code() is grpc.StatusCode.UNAVAILABLE:
            raise _Unanswered(_error(exc)) from None
        await exchange.start(tuple(exc.initial_metadata() or ()))
        raise _error(exc) from None
    except asyncio.CancelledError:
        call.cancel()
        raise
    await exchange.start(tuple(await call.initial_metadata() or ()))
    await exchange.message(response)
    await exchange.finish(None, tuple(await call.trailing_metadata() or ()))


async def _stream(backend: Backend, method: Method, wire: bytes, metadata: Metadata, timeout: float | None,
                  exchange: Exchange) -> None:
    call = backend.unary_stream(method.path)(wire, metadata=metadata, timeout=timeout)
    started = False
    try:
        async for response in call:
            if not started:
                await exchange.start(tuple(await call.initial_metadata() or ()))
                started = True
            await exchange.message(response)
    except grpc.aio.AioRpcError as exc:
        if not started and exc.code() is grpc.StatusCode.UNAVAILABLE:
            raise _Unanswered(_error(exc)) from None
        if not started:
            await exchange.start(tuple(exc.initial_metadata() or ()))
        raise _error(exc) from None
    except asyncio.CancelledError:
        call.cancel()
        raise
    if not started:
        await exchange.start(tuple(await call.initial_metadata() or ()))
    await exchange.finish(None, tuple(await call.trailing_metadata() or ()))
