"""One WebSocket connection of the client, and the helpers of the connection loop."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeAlias

from ..exceptions import ClientError

Token: TypeAlias = "str | Callable[[], str | Awaitable[str]] | None"


class Abortable(Protocol):
    def abort(self) -> None: ...


class ClientSocket(Protocol):
    """What the client uses of one open WebSocket: a websockets ``ClientConnection``,
    or an in-process socket (:mod:`herald.testing`).

    ``recv`` raises :class:`websockets.exceptions.ConnectionClosed` once the socket
    ended; ``close_code``/``close_reason`` then say how.  ``transport.abort()`` drops
    the connection without a closing handshake.
    """

    @property
    def close_code(self) -> int | None: ...

    @property
    def close_reason(self) -> str | None: ...

    @property
    def transport(self) -> Abortable: ...

    async def send(self, message: str) -> None: ...

    async def recv(self) -> str | bytes: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...


class Link:
    """One WebSocket connection and the commands in flight on it."""

    def __init__(self, ws: ClientSocket) -> None:
        self.ws = ws
        self.pending: dict[
            int, tuple[asyncio.Future[dict[str, Any]], Callable[[dict[str, Any]], None] | None]
        ] = {}
        self.idle_timeout: float | None = None
        self.reader: asyncio.Task[tuple[int, str]] | None = None
        self.closed_by: tuple[int, str] | None = None  # from a disconnect push

    def fail(self, error: BaseException) -> None:
        for future, _ in self.pending.values():
            if not future.done():
                future.set_exception(error)
                future.exception()
        self.pending.clear()


class RetryableError(Exception):
    pass


class FatalError(Exception):
    def __init__(self, error: ClientError, code: int, reason: str) -> None:
        self.error = error
        self.code = code
        self.reason = reason


async def call_token(token: Token) -> str | None:
    """The token ``token`` stands for: the string, or what the callable returns."""
    if not callable(token):
        return token
    try:
        value = token()
        return await value if inspect.isawaitable(value) else value
    except Exception as exc:
        raise RetryableError("token callable failed") from exc


def consume_result(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def describe_error(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    return text
