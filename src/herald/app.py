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
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request, WebSocket, WebSocketDisconnect

from .apiguard import FRAME_HEADERS_DICT, local_address
from .brokers.base import Broker, ClientInfo, StreamPosition
from .codes import CloseCode
from .commands import ProtocolHandler, render_publication
from .config import Settings
from .connection import Connection, Renderer
from .endpoints import BroadcastInput, json_answer, log_disconnect, new_connection
from .exceptions import DisconnectError
from .hosts import handshake_refusal
from .node import Node
from .presence.base import PresenceManager
from .protocol.messages import SUBPROTOCOL
from .protocol.session import SessionState
from .transports.fastapi import (
    client_ip,
    close_quietly,
    install_log_filters,
    read_loop,
    refuse_handshake,
    remote_address,
    settle,
)
from .transports.fastpath import SCOPE_KEY as FAST_PATH_SCOPE_KEY
from .transports.fastpath import transport_for
from .tutorial import echo_reply, render_broadcast

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

    async def publish(self, channel: str, data: Any, *, info: ClientInfo | None = None) -> StreamPosition:
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
        install_log_filters()
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
            if app is not None:
                from .transports.native import unregister_routes

                unregister_routes(app)
            await self.close()

    def serve_natively(self, app: Any, paths: dict[str, str]) -> None:
        """Serve ``app``'s WebSocket ``paths`` (path -> route name, as in :attr:`router`)
        without ASGI under :class:`~herald.transports.native.HeraldWebSocketProtocol`.

        ``create_app`` does it for its four routes.  In any other app a route is
        registered the first time a handshake reaches it through ASGI on Herald's
        protocol class, at the path the app routed it from (prefixes included).
        Natively served routes bypass ASGI middleware (see :mod:`herald.transports.native`).
        """
        if not (self.settings.fast_path and self.settings.native_routes):
            return
        from .endpoints import native_route
        from .transports.native import register_routes

        register_routes(app, {path: native_route(self, name) for path, name in paths.items()})

    def _learn_native_path(self, websocket: WebSocket, name: str) -> None:
        scope = websocket.scope
        app = scope.get("app")
        if app is None or scope.get(FAST_PATH_SCOPE_KEY) is None:
            return  # not on Herald's protocol class: nothing would serve it natively
        root_path = scope.get("root_path", "")
        path = scope["path"]
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        from .transports.native import is_registered

        # Registered already, yet served here: the app is out of the server's reach (a
        # mounted sub-application); registering again on every handshake would not help.
        if not is_registered(app, path):
            self.serve_natively(app, {path: name})

    @property
    def api_router(self) -> APIRouter:
        """The HTTP server API (``/api/...``)."""
        if self._api_router is None:
            from .api import build_api_router

            self._api_router = build_api_router(self)
        return self._api_router

    @property
    def asyncapi_router(self) -> APIRouter:
        """``/asyncapi.json`` (AsyncAPI 3.0 document) and ``/asyncapi`` (its docs page)."""
        from fastapi.responses import HTMLResponse, JSONResponse

        from .asyncapi import build_asyncapi, render_html

        router = APIRouter(tags=["contract"])
        cache: dict[tuple[str, bool, tuple[str, ...]], tuple[Any, str]] = {}

        def document(request: Request) -> tuple[Any, str]:
            # Generated once per (host, scheme, registered RPC methods): RPC methods added
            # after start-up still appear.
            key = (request.url.netloc, request.url.scheme == "https", tuple(self.node.rpc_methods))
            if key not in cache:
                doc = build_asyncapi(self.settings, self.node.rpc_methods, host=key[0], secure=key[1])
                cache.clear()
                cache[key] = (doc, render_html(doc))
            return cache[key]

        # response_model=None: the return annotation is a string under postponed evaluation,
        # and FastAPI would try (and fail) to build a response model from it.
        @router.get(
            "/asyncapi.json",
            summary="AsyncAPI 3.0 document of the WebSocket protocol",
            response_model=None,
        )
        async def asyncapi_json(request: Request) -> JSONResponse:
            return JSONResponse(document(request)[0])

        @router.get(
            "/asyncapi",
            summary="The WebSocket protocol's docs page",
            response_class=HTMLResponse,
            response_model=None,
        )
        async def asyncapi_page(request: Request) -> HTMLResponse:
            return HTMLResponse(document(request)[1], headers=FRAME_HEADERS_DICT)

        return router

    # ------------------------------------------------------------ endpoints

    def _connection(self, websocket: WebSocket, renderer: Renderer, *, protocol: bool) -> Connection:
        transport = transport_for(websocket, fast_path=self.settings.fast_path)
        return new_connection(self, transport, remote_address(websocket), renderer, protocol)

    def _guarded(
        self, endpoint: Callable[[WebSocket], Awaitable[None]], name: str
    ) -> Callable[[WebSocket], Awaitable[None]]:
        """Wrap a WebSocket endpoint in the checks every route gets before accept: the
        Host and Origin allow-lists (HTTP 403; the same function as on the native path)
        and the per-IP connection limit (HTTP 403, logged)."""
        node, settings = self.node, self.settings

        @functools.wraps(endpoint)
        async def guarded(websocket: WebSocket) -> None:
            headers = websocket.headers
            refusal = handshake_refusal(
                settings,
                host=headers.get("host"),
                origin=headers.get("origin"),
                local_address=local_address(websocket.scope),
                scheme=websocket.url.scheme,
            )
            if refusal is not None:
                node.record_rejection(refusal.kind)
                await refuse_handshake(websocket, refusal.reason)
                return
            self._learn_native_path(websocket, name)
            websocket.scope["herald.handshake_checked"] = True
            ip = client_ip(websocket)
            if not node.ip_connections.acquire(ip):
                node.record_rejection("ip_limit")
                await refuse_handshake(websocket, "too many connections from this address")
                return
            try:
                await endpoint(websocket)
            finally:
                node.ip_connections.release(ip)

        return guarded

    def _add_routes(self, router: APIRouter) -> None:
        guarded = self._guarded
        # Plain Starlette WebSocket routes: the endpoints take no FastAPI dependencies, and
        # FastAPI's WebSocket route would keep two AsyncExitStacks and its dependency
        # state alive for the whole life of every connection (about 3 KiB each).
        for path, name, endpoint in (
            ("/connect", "herald_connect", self._connect_endpoint),
            ("/ws", "tutorial_echo", self._echo_endpoint),
            ("/ws_json", "tutorial_json", self._json_endpoint),
            ("/ws_broadcast", "tutorial_broadcast", self._broadcast_endpoint),
        ):
            router.add_websocket_route(path, guarded(endpoint, name), name=name)

    async def _connect_endpoint(self, websocket: WebSocket) -> None:
        """Protocol v1 (see docs/protocol.md)."""
        settings = self.settings
        requested = websocket.scope.get("subprotocols") or []
        await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in requested else None)
        connection = self._connection(websocket, render_publication, protocol=True)
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
        finally:
            await settle(connection, ending)
            await handler.close()
            await connection.stop()
        log_disconnect(connection)

    async def _echo_endpoint(self, websocket: WebSocket) -> None:
        """``/ws``: ``Message text was: {data}``."""
        await websocket.accept()
        send = websocket.send_text

        async def reply(text: str) -> None:
            await send(echo_reply(text))

        await self._simple_loop(websocket, reply)

    async def _json_endpoint(self, websocket: WebSocket) -> None:
        """``/ws_json``: ``{"message": "Received JSON data", "data": ...}``.

        Malformed JSON gets ``{"error": {"code": 1007, "message": ...}}`` and a close 1007.
        """
        await websocket.accept()
        send = websocket.send_text

        async def reply(text: str) -> None:
            answer, malformed = json_answer(text)
            await send(answer)
            if malformed:
                raise _MalformedJSONError

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
        await websocket.accept()
        connection = self._connection(websocket, render_broadcast, protocol=False)
        connection.start()
        broadcast = BroadcastInput(self.node, connection)
        ending = None
        try:
            joining = broadcast.join()
            if joining is not None:
                await joining
            ending = await read_loop(websocket, broadcast.on_text, max_size=self.settings.max_message_size)
        except DisconnectError as exc:
            connection.close(exc.code, exc.reason, push=False)
            await connection.wait_closed(2.0)
        except Exception as exc:
            logger.debug("broadcast connection %s ended: %r", connection.client_id, exc)
        finally:
            await settle(connection, ending, push=False)
            await self.node.unregister(connection, protocol_channels=False)
            await connection.stop()


class _MalformedJSONError(Exception):
    """Ends a ``/ws_json`` loop after the error frame was sent."""
