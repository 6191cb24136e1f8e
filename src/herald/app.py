"""``Herald``: the object a FastAPI application mounts.

::

    from fastapi import FastAPI
    from herald import Herald

    herald = Herald()
    app = FastAPI(lifespan=herald.lifespan)
    app.include_router(herald.router)          # /connect and the tutorial's /ws, /ws_json, /ws_broadcast
    app.include_router(herald.api_router)      # /api/... (publish, presence, history, ...)

    @herald.rpc("move")
    async def move(params: Move, ctx: ClientContext) -> MoveResult: ...

    @app.post("/orders")
    async def create_order() -> dict:
        await herald.publish("orders:new", {"id": 1})
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, FastAPI, WebSocket, WebSocketDisconnect

from .brokers.base import Broker, ClientInfo, StreamPosition
from .codes import CloseCode
from .commands import ProtocolHandler, render_publication
from .config import Settings
from .connection import Connection
from .node import Node
from .presence.base import PresenceManager
from .protocol.messages import SUBPROTOCOL
from .protocol.session import SessionState
from .transports.fastapi import (
    StarletteTransport,
    check_handshake,
    close_quietly,
    new_client_id,
    read_loop,
    remote_address,
)
from .tutorial import BROADCAST_CHANNEL, echo_reply, json_reply, render_broadcast

logger = logging.getLogger("herald")

F = TypeVar("F", bound=Callable[..., Any])


class Herald:
    """Herald inside a FastAPI application.

    ``settings`` default to :class:`~herald.config.Settings` read from ``HERALD_*``
    environment variables.  ``broker`` and ``presence`` default to the engines the
    settings name (in-memory unless ``settings.broker`` is a URL).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        broker: Broker | None = None,
        presence: PresenceManager | None = None,
    ) -> None:
        self.settings = settings or Settings()
        if broker is None and presence is None:
            from .engines import engines_for

            broker, presence = engines_for(self.settings)
        self.node = Node(self.settings, broker=broker, presence=presence)
        self.router = APIRouter()
        self._add_routes(self.router)
        self._api_router: APIRouter | None = None

    # ------------------------------------------------------------ app API

    async def publish(
        self, channel: str, data: Any, *, info: ClientInfo | None = None
    ) -> StreamPosition:
        """Publish ``data`` to ``channel`` on every node; returns its position."""
        return await self.node.publish(channel, data, info=info)

    def rpc(self, method: str) -> Callable[[F], F]:
        """Register an RPC handler: ``async def handler(params: Model, ctx: ClientContext)``.

        ``params`` are validated against the annotation; a validation error becomes an
        ``INVALID_PARAMS`` (114) error reply.  Return a model, or any JSON value.
        """

        def decorator(func: F) -> F:
            self.node.add_rpc(method, func)
            return func

        return decorator

    def on_connect(self, func: F) -> F:
        """Hook ``(ctx)``: may set ``ctx.user``/``ctx.info`` or raise to refuse the client."""
        self.node.add_hook("connect", func)
        return func

    def on_subscribe(self, func: F) -> F:
        """Hook ``(ctx, channel)``: raise :class:`~herald.PermissionDeniedError` to refuse."""
        self.node.add_hook("subscribe", func)
        return func

    def on_publish(self, func: F) -> F:
        """Hook ``(ctx, channel, data)``: raise to refuse; return a value to replace the data."""
        self.node.add_hook("publish", func)
        return func

    def on_disconnect(self, func: F) -> F:
        """Hook ``(ctx, code, reason)`` after a client left."""
        self.node.add_hook("disconnect", func)
        return func

    async def start(self) -> None:
        await self.node.start()

    async def close(self) -> None:
        await self.node.close()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI | None = None) -> AsyncIterator[None]:
        """Use as ``FastAPI(lifespan=herald.lifespan)``."""
        await self.start()
        try:
            yield
        finally:
            await self.close()

    @property
    def api_router(self) -> APIRouter:
        """The HTTP server API (``/api/...``)."""
        if self._api_router is None:
            from .api import build_api_router

            self._api_router = build_api_router(self)
        return self._api_router

    # ------------------------------------------------------------ endpoints

    def _connection(
        self, websocket: WebSocket, renderer: Any, *, echo_own: bool, events: bool
    ) -> Connection:
        settings = self.settings
        return Connection(
            StarletteTransport(websocket),
            new_client_id(),
            renderer=renderer,
            echo_own=echo_own,
            events=events,
            max_queue_messages=settings.max_queue_messages,
            max_queue_bytes=settings.max_queue_bytes,
            remote=remote_address(websocket),
        )

    def _add_routes(self, router: APIRouter) -> None:
        router.add_api_websocket_route("/connect", self._connect_endpoint, name="herald_connect")
        router.add_api_websocket_route("/ws", self._echo_endpoint, name="tutorial_echo")
        router.add_api_websocket_route("/ws_json", self._json_endpoint, name="tutorial_json")
        router.add_api_websocket_route(
            "/ws_broadcast", self._broadcast_endpoint, name="tutorial_broadcast"
        )

    async def _connect_endpoint(self, websocket: WebSocket) -> None:
        """Protocol v1 (see docs/protocol.md)."""
        settings = self.settings
        if not await check_handshake(websocket, settings):
            return
        requested = websocket.scope.get("subprotocols") or []
        await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in requested else None)
        connection = self._connection(websocket, render_publication, echo_own=True, events=True)
        handler = ProtocolHandler(self.node, connection, websocket.scope)
        connection.start()
        deadline = time.monotonic() + settings.handshake_timeout

        def handshake_time_left() -> float | None:
            if handler.session.state is SessionState.CONNECTING:
                return deadline - time.monotonic()
            return None

        ending = None
        try:
            ending = await read_loop(
                websocket,
                handler.handle_text,
                max_size=settings.max_message_size,
                first_timeout=handshake_time_left,
            )
        except Exception as exc:  # the socket broke under us
            logger.debug("connection %s ended: %r", connection.client_id, exc)
            connection.peer_closed(1006)
        finally:
            if ending is not None:
                if ending.by_peer:
                    connection.peer_closed(ending.code)
                else:
                    connection.close(ending.code, ending.reason)
                    await connection.wait_closed(2.0)
            await handler.close()
            await connection.stop()
        logger.info(
            "client %s (%s) user=%r closed %s %s",
            connection.client_id,
            connection.remote,
            connection.user,
            connection.close_code,
            connection.close_reason,
        )

    async def _echo_endpoint(self, websocket: WebSocket) -> None:
        """``/ws``: ``Message text was: {data}``."""
        settings = self.settings
        if not await check_handshake(websocket, settings):
            return
        await websocket.accept()
        send = websocket.send_text

        async def reply(text: str) -> None:
            await send(echo_reply(text))

        await self._simple_loop(websocket, reply)

    async def _json_endpoint(self, websocket: WebSocket) -> None:
        """``/ws_json``: ``{"message": "Received JSON data", "data": ...}``.

        Malformed JSON gets ``{"error": {"code": 1007, "message": ...}}`` and a close 1007.
        """
        if not await check_handshake(websocket, self.settings):
            return
        await websocket.accept()
        send = websocket.send_text

        async def reply(text: str) -> None:
            try:
                value = orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                message = f"malformed JSON: {exc}"
                await send(orjson.dumps({"error": {"code": 1007, "message": message}}).decode())
                raise _MalformedJSONError from None
            await send(json_reply(value))

        try:
            await self._simple_loop(websocket, reply)
        except _MalformedJSONError:
            await close_quietly(websocket, CloseCode.INVALID_PAYLOAD, "malformed JSON")

    async def _simple_loop(self, websocket: WebSocket, reply: Callable[[str], Any]) -> None:
        try:
            ending = await read_loop(websocket, reply, max_size=self.settings.max_message_size)
        except (OSError, WebSocketDisconnect, RuntimeError) as exc:
            # The peer vanished while we were replying; there is nothing to clean up.
            logger.debug("tutorial connection ended: %r", exc)
            return
        if not ending.by_peer:
            await close_quietly(websocket, ending.code, ending.reason)

    async def _broadcast_endpoint(self, websocket: WebSocket) -> None:
        """``/ws_broadcast``: ``New message: {data}`` to every other client, via the hub and broker."""
        node = self.node
        if not await check_handshake(websocket, self.settings):
            return
        await websocket.accept()
        connection = self._connection(websocket, render_broadcast, echo_own=False, events=False)
        connection.start()
        await node.admit(connection)
        node.hub.subscribe(BROADCAST_CHANNEL, connection)
        info = ClientInfo(connection.client_id, "")

        async def on_text(text: str) -> None:
            node.stats["messages_in"] += 1
            try:
                await node.publish_internal(BROADCAST_CHANNEL, orjson.dumps(text), info)
            except Exception as exc:
                logger.warning("broadcast publish failed: %r", exc)
                connection.send(f"Error: broadcast failed ({type(exc).__name__})")

        ending = None
        try:
            await node.ensure_broker_subscription(BROADCAST_CHANNEL)
            ending = await read_loop(websocket, on_text, max_size=self.settings.max_message_size)
        except Exception as exc:
            logger.debug("broadcast connection %s ended: %r", connection.client_id, exc)
            connection.peer_closed(1006)
        finally:
            if ending is not None:
                if ending.by_peer:
                    connection.peer_closed(ending.code)
                else:
                    connection.close(ending.code, ending.reason, push=False)
                    await connection.wait_closed(2.0)
            await node.unregister(connection, protocol_channels=False)
            await connection.stop()


class _MalformedJSONError(Exception):
    """Ends a ``/ws_json`` loop after the error frame was sent."""
