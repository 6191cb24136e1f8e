"""One WebSocket connection of the client, and the helpers of the connection loop."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

from websockets.asyncio.client import ClientConnection

from ..exceptions import ClientError

Token: TypeAlias = "str | Callable[[], str | Awaitable[str]] | None"


class Link:
    """One WebSocket connection and the commands in flight on it."""

    def __init__(self, ws: ClientConnection) -> None:
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
