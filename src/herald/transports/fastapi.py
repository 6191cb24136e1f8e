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
import logging
import secrets
from collections.abc import Awaitable, Callable

from starlette.responses import PlainTextResponse
from starlette.websockets import WebSocket, WebSocketState

from ..auth import check_origin
from ..codes import CloseCode
from ..config import Settings

logger = logging.getLogger("herald.transport")


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

        ASGI has no way to abort a socket; uvicorn's protocol object is the owner of
        the ``send`` callable, and its asyncio transport can be aborted.
        """
        owner = getattr(self.websocket.scope.get("herald.send", self._send), "__self__", None)
        transport = getattr(owner, "transport", None)
        abort = getattr(transport, "abort", None)
        if callable(abort):
            abort()


def new_client_id() -> str:
    return secrets.token_hex(8)


def remote_address(websocket: WebSocket) -> str:
    client = websocket.client
    return f"{client.host}:{client.port}" if client else "unknown"


async def refuse_handshake(websocket: WebSocket, status: int, reason: str) -> None:
    """Refuse before accept: an HTTP response with ``reason`` where the server
    supports it (ASGI websocket denial response), otherwise a plain 403."""
    logger.warning(
        "refused WebSocket %s from %s: %s", websocket.url.path, remote_address(websocket), reason
    )
    extensions = websocket.scope.get("extensions") or {}
    if "websocket.http.response" in extensions:
        await websocket.send_denial_response(PlainTextResponse(reason + "\n", status_code=status))
    else:
        await websocket.close(CloseCode.POLICY_VIOLATION, reason)


async def check_handshake(websocket: WebSocket, settings: Settings) -> bool:
    """Run the checks that happen before accept; refuse and return False on failure."""
    headers = websocket.headers
    refusal = check_origin(
        headers.get("origin"),
        headers.get("host"),
        settings.allowed_origins,
        allow_missing=settings.allow_missing_origin,
        scheme=websocket.url.scheme,
    )
    if refusal is not None:
        await refuse_handshake(websocket, 403, refusal)
        return False
    return True


TextHandler = Callable[[str], Awaitable[None]]


class FrameTooBigError(Exception):
    pass


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
            return Ending(CloseCode.UNSUPPORTED_DATA, "binary frames are not supported", False)
        # len(text) <= bytes <= 4 * len(text): only encode when it could matter.
        if len(text) * 4 > max_size and len(text.encode()) > max_size:
            return Ending(CloseCode.MESSAGE_TOO_BIG, f"message larger than {max_size} bytes", False)
        await on_text(text)


async def close_quietly(websocket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        if websocket.application_state is WebSocketState.CONNECTED and (
            websocket.client_state is WebSocketState.CONNECTED
        ):
            await websocket.close(code, reason[:120])


__all__ = [
    "Ending",
    "StarletteTransport",
    "check_handshake",
    "close_quietly",
    "new_client_id",
    "read_loop",
    "refuse_handshake",
    "remote_address",
]
