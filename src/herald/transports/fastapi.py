"""The FastAPI/Starlette adapter: handshake checks, the read loop, the transport.

This is the only module of the core that touches Starlette's WebSocket.  Its
read loop feeds text frames to a handler and maps every kind of bad input to a
documented close code instead of a traceback:

* a binary frame on a text endpoint: close 1003;
* a frame over ``max_message_size``: close 1009;
* (``/ws_json``) malformed JSON: close 1007 after an error frame;
* invalid UTF-8 in a text frame: close 1007 (done by the WebSocket layer).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.websockets import WebSocket, WebSocketState

from ..auth import check_origin, install_token_redaction
from ..codes import BINARY_REFUSED, CloseCode
from ..config import Settings
from ..connection import Connection, new_client_id

logger = logging.getLogger("herald.transport")


class _QuietProtocolErrors(logging.Filter):
    """uvicorn logs a full traceback when a client sends invalid UTF-8 (it then closes with
    1007, which is correct).  Bad client input must not put tracebacks in our logs: keep the
    one-line message and drop the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and "Invalid UTF-8" in str(record.msg):
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def install_log_filters() -> None:
    """Idempotently attach Herald's filters to uvicorn's error logger."""
    target = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietProtocolErrors) for f in target.filters):
        target.addFilter(_QuietProtocolErrors())
    # uvicorn logs the handshake path with its query string: keep ?token=... out of logs.
    install_token_redaction("uvicorn.error", "uvicorn.access", "herald", "herald.transport")


class StarletteTransport:
    """:class:`~herald.transports.base.Transport` over a Starlette WebSocket."""

    __slots__ = ("_closed", "_send", "websocket")

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self._send = websocket.send
        self._closed = False

    async def send(self, frame: str) -> None:
        await self._send({"type": "websocket.send", "text": frame})

    async def close(self, code: int, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.websocket.application_state is WebSocketState.CONNECTED:
                # A peer that stopped reading blocks the close frame behind flow control.
                await asyncio.wait_for(self.websocket.close(code, reason[:120]), 2.0)
        except TimeoutError:
            self.abort()
        except Exception:
            pass

    def abort(self) -> None:
        """Drop the TCP connection when the server exposes it (uvicorn does), else do nothing.

        ASGI has no way to abort a socket.  uvicorn hands the application its protocol
        object's bound ``receive``; that protocol owns the asyncio transport, which we abort
        so that a peer that stopped reading cannot pin a connection open.
        """
        receive = getattr(self.websocket, "_receive", None)
        transport = getattr(getattr(receive, "__self__", None), "transport", None)
        abort = getattr(transport, "abort", None)
        if transport is None or not callable(abort):
            return
        # Linger 0: the kernel resets the connection and drops the unsent bytes at once,
        # instead of holding them (and the socket) until the stuck peer reads them.
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        abort()


def remote_address(websocket: WebSocket) -> str:
    client = websocket.client
    return f"{client.host}:{client.port}" if client else "unknown"


async def refuse_handshake(websocket: WebSocket, reason: str) -> None:
    """Refuse before accept: the server answers the handshake with HTTP 403; ``reason`` is logged."""
    logger.warning("refused WebSocket %s from %s: %s", websocket.url.path, remote_address(websocket), reason)
    await websocket.close(CloseCode.POLICY_VIOLATION, reason)


def client_ip(websocket: WebSocket) -> str:
    """The client's IP: the peer address, or the forwarded one when uvicorn trusts the proxy
    (``--proxy-headers`` with ``forwarded_allow_ips``)."""
    client = websocket.client
    return client.host if client else "unknown"


async def check_handshake(websocket: WebSocket, settings: Settings) -> bool:
    """Run the checks that happen before accept; refuse and return False on failure."""
    if websocket.scope.get("herald.handshake_checked"):
        return True  # already done by Herald's route guard
    headers = websocket.headers
    refusal = check_origin(
        headers.get("origin"),
        headers.get("host"),
        settings.allowed_origins,
        allow_missing=settings.allow_missing_origin,
        scheme=websocket.url.scheme,
    )
    if refusal is not None:
        await refuse_handshake(websocket, refusal)
        return False
    return True


TextHandler = Callable[[str], Awaitable[None]]


class Ending:
    """How a read loop ended: the close ``code`` and ``reason``, and whether the peer closed."""

    __slots__ = ("by_peer", "code", "reason")

    def __init__(self, code: int, reason: str, by_peer: bool) -> None:
        self.code, self.reason, self.by_peer = code, reason, by_peer


async def read_loop(
    websocket: WebSocket,
    on_text: TextHandler,
    *,
    max_size: int,
    first_timeout: Callable[[], float | None] | None = None,
) -> Ending:
    """Feed text frames to ``on_text`` until the peer leaves or breaks a rule.

    ``first_timeout`` returns the seconds left to wait for the next frame (None: no
    limit); it enforces the protocol's handshake timeout.
    """
    receive = websocket.receive
    while True:
        timeout = first_timeout() if first_timeout is not None else None
        if timeout is not None:
            if timeout <= 0:
                return Ending(CloseCode.HANDSHAKE_TIMEOUT, "handshake timeout", False)
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except TimeoutError:
                return Ending(CloseCode.HANDSHAKE_TIMEOUT, "handshake timeout", False)
        else:
            message = await receive()
        if message["type"] == "websocket.disconnect":
            return Ending(int(message.get("code") or 1005), str(message.get("reason") or ""), True)
        text = message.get("text")
        if text is None:
            return Ending(CloseCode.UNSUPPORTED_DATA, BINARY_REFUSED, False)
        # len(text) <= bytes <= 4 * len(text): only encode when it could matter.
        if len(text) * 4 > max_size and len(text.encode()) > max_size:
            return Ending(CloseCode.MESSAGE_TOO_BIG, f"message larger than {max_size} bytes", False)
        await on_text(text)


async def settle(connection: Connection, ending: Ending | None, *, push: bool = True) -> None:
    """After a read loop: record how ``connection`` ended and let its writer finish.

    ``ending`` is None when the socket broke under the loop (counted as 1006).  When
    Herald ended the loop (bad frame, timeout), the client is closed with that code, after
    a disconnect push if ``push``, and given up to 2 s to flush.
    """
    if ending is None:
        connection.peer_closed(1006)
    elif ending.by_peer:
        connection.peer_closed(ending.code)
    else:
        connection.close(ending.code, ending.reason, push=push)
        await connection.wait_closed(2.0)


async def close_quietly(websocket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        if websocket.application_state is WebSocketState.CONNECTED and (
            websocket.client_state is WebSocketState.CONNECTED
        ):
            await websocket.close(code, reason[:120])


async def run_dependency(dependency: Callable[..., Any], scope: MutableMapping[str, Any]) -> Any:
    """Run a FastAPI dependency callable against a WebSocket handshake's ASGI ``scope``.

    For Herald hooks (``on_connect``, ``on_subscribe``, ...) that want to reuse the
    app's dependencies: ``user = await run_dependency(current_user, ctx.scope)``.
    Sub-dependencies, ``Header``/``Cookie``/``Query`` parameters and
    ``WebSocket``/``HTTPConnection`` parameters are resolved as FastAPI does;
    yield-dependencies are finished before this returns.  A parameter that cannot
    be resolved raises :class:`fastapi.exceptions.WebSocketRequestValidationError`;
    an ``HTTPException`` raised by the dependency propagates (Herald maps exceptions
    in hooks to error replies).
    """
    from fastapi.dependencies.utils import get_dependant, solve_dependencies
    from fastapi.exceptions import WebSocketRequestValidationError

    async def no_receive() -> Any:
        raise RuntimeError("a dependency cannot read from the WebSocket")

    async def no_send(message: Any) -> None:
        raise RuntimeError("a dependency cannot write to the WebSocket")

    dependant = get_dependant(path=str(scope.get("path", "/")), call=dependency)
    async with contextlib.AsyncExitStack() as stack:
        # FastAPI's routes put their exit stacks in the scope; yield-dependencies need them.
        own_scope = {
            **scope,
            "fastapi_inner_astack": stack,
            "fastapi_function_astack": stack,
        }
        websocket = WebSocket(own_scope, receive=no_receive, send=no_send)
        solved = await solve_dependencies(
            request=websocket,
            dependant=dependant,
            async_exit_stack=stack,
            embed_body_fields=False,
        )
        if solved.errors:
            raise WebSocketRequestValidationError(solved.errors)
        result = dependency(**solved.values)
        if inspect.isawaitable(result):
            result = await result
        elif inspect.isgenerator(result) or inspect.isasyncgen(result):
            raise TypeError("run_dependency: call generator dependencies from another dependency")
        return result


__all__ = [
    "Ending",
    "StarletteTransport",
    "check_handshake",
    "client_ip",
    "close_quietly",
    "install_log_filters",
    "new_client_id",
    "read_loop",
    "refuse_handshake",
    "remote_address",
    "run_dependency",
    "settle",
]
