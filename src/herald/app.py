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
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.staticfiles import StaticFiles
from starlette.routing import Route as HttpRoute
from starlette.routing import WebSocketRoute

from .apiguard import FRAME_HEADERS_DICT
from .brokers.base import Broker, ClientInfo, StreamPosition
from .config import Settings
from .emulation import add_emulation_routes
from .node import Node
from .presence.base import PresenceManager
from .sessions import route as session_route
from .sse import STREAM_ROUTES, StreamRoute
from .transports.asgi import AsgiRoute
from .transports.base import Route
from .transports.uvicorn import abort_for, install_log_filters, register_routes

if TYPE_CHECKING:
    from .outbox.consumer import OutboxConsumer

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
        #: Route name -> the route both drivers serve (see :meth:`serve_natively`).
        self.routes: dict[str, Route] = {}
        self._add_routes(self.router)
        self._api_router: APIRouter | None = None
        #: Publishes the outbox table's rows while the app runs, when ``settings.outbox`` is set.
        self._outbox: OutboxConsumer | None = None

    # ------------------------------------------------------------ app API

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        info: ClientInfo | None = None,
        idempotency_key: str | None = None,
    ) -> StreamPosition:
        """Publish ``data`` to ``channel`` on every node; returns its position.

        With ``idempotency_key`` a retry within ``idempotency_window`` publishes nothing
        and returns the original position (docs/backends.md).
        """
        return await self.node.publish(channel, data, info=info, idempotency_key=idempotency_key)

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
        if self.settings.outbox is not None and self._outbox is None:
            from .outbox.consumer import OutboxConsumer

            self._outbox = OutboxConsumer(self.node, self.settings.outbox, table=self.settings.outbox_table)
            await self._outbox.start()

    async def close(self) -> None:
        if self._outbox is not None:
            # Before the node: the batch in progress still publishes through the broker.
            await self._outbox.close()
            self._outbox = None
        await self.node.close()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI | None = None) -> AsyncIterator[None]:
        """Use as ``FastAPI(lifespan=herald.lifespan)``."""
        await self.start()
        try:
            yield
        finally:
            await self.close()

    def serve_natively(self, app: Any, paths: dict[str, str]) -> None:
        """Serve ``app``'s WebSocket ``paths`` (path -> route name, as in :attr:`router`)
        natively, without ASGI, when the server runs
        :class:`~herald.transports.uvicorn.HeraldWebSocketProtocol`.

        ``create_app`` does it for its four routes.  Any other app states the paths it
        mounted Herald's routes at, prefixes included (``{"/rt/connect": "herald_connect"}``);
        a route it does not name stays on ASGI.  Natively served routes bypass ASGI
        middleware (see docs/library.md).  Nothing happens unless ``settings.fast_path``
        and ``settings.native_routes`` are on.
        """
        if not (self.settings.fast_path and self.settings.native_routes):
            return
        register_routes(app, {path: self.routes[name] for path, name in paths.items()})

    def static_files(self) -> StaticFiles:
        """The browser client's files, for ``app.mount("/static", herald.static_files())``:
        ``herald.js`` and its TypeScript declarations (``herald.d.ts``, ``herald-protocol.d.ts``,
        served as ``application/typescript``); any other path answers 404.  See docs/library.md.
        """
        from .static_files import CLIENT_FILES, HeraldStaticFiles

        return HeraldStaticFiles(only=CLIENT_FILES)

    @property
    def api_router(self) -> APIRouter:
        """The HTTP server API (``/api/...``)."""
        if self._api_router is None:
            from .api import build_api_router

            self._api_router = build_api_router(self.node)
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

    # ------------------------------------------------------------ WebSocket routes

    def _add_routes(self, router: APIRouter) -> None:
        """One :class:`~herald.transports.base.Route` per route name, served through ASGI
        here and natively where :meth:`serve_natively` says so: the same sessions and
        admission either way (:mod:`herald.sessions`)."""
        fast_path = self.settings.fast_path
        for path, name in ROUTE_PATHS.items():
            route = self.routes[name] = session_route(self.node, name)
            # A raw ASGI app as a Starlette WebSocket route: no FastAPI dependency state,
            # no Starlette WebSocket object kept alive per connection.
            endpoint = AsgiRoute(route, fast_path=fast_path, abort_for=abort_for)
            router.routes.append(WebSocketRoute(path, endpoint, name=name))
        # /sse and /stream (herald.sse): plain HTTP, the same ASGI app on every serving path.
        for name, (path, kind, label) in STREAM_ROUTES.items():
            router.routes.append(HttpRoute(path, StreamRoute(self.node, kind, label), name=name))
        # /emulation/connect and /emulation (herald.emulation): protocol v1 over HTTP
        # streaming and POSTs, for clients whose WebSocket is blocked.
        add_emulation_routes(router, self.node)


#: Herald's WebSocket routes in :attr:`Herald.router`: path -> route name.
ROUTE_PATHS: dict[str, str] = {
    "/connect": "herald_connect",
    "/ws": "tutorial_echo",
    "/ws_json": "tutorial_json",
    "/ws_broadcast": "tutorial_broadcast",
}
