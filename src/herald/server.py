"""``create_app()``: the application ``herald serve`` runs.

``uvicorn herald.server:app`` works too: ``app`` is built on first access from
``HERALD_*`` environment variables.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .apidocs import add_offline_docs
from .apiguard import HostGuardMiddleware
from .app import ROUTE_PATHS, Herald
from .config import Settings
from .static_files import ADMIN_FILES, CLIENT_FILES, HeraldStaticFiles
from .transports.sse import HEAD_AS_GET

#: The WebSocket routes ``create_app`` mounts at the root: path -> route name.
ROUTE_NAMES = ROUTE_PATHS


def create_app(settings: Settings | None = None, *, herald: Herald | None = None) -> FastAPI:
    """Build the Herald server application.

    Routes: ``/connect`` (protocol v1), ``/ws``, ``/ws_json``, ``/ws_broadcast``
    (the tutorial's), ``/api/...`` (server API), ``/healthz``, ``/readyz``,
    ``/docs`` and ``/redoc`` (with local assets: they work offline),
    ``/static/...`` (the JS client; the admin page's script with the admin page on; the
    demo pages only with the demos on) and the demo index at ``/``.  Every HTTP
    request must name an allowed ``Host`` (see :mod:`herald.hosts`); ``HEAD`` is
    answered wherever ``GET`` is (:class:`HeadAsGet`).
    """
    herald = herald or Herald(settings)
    settings = herald.settings

    demo_context: contextlib.AbstractAsyncContextManager[None] = contextlib.nullcontext()
    if settings.demos:
        from .demos import install_demos

        # The chat's presence shows connect names; the dashboard's figures are published here.
        demo_context = install_demos(herald)

    from .shutdown import drain_on_signals

    operations: list[contextlib.AbstractAsyncContextManager[None]] = []
    metrics = admin = None
    if settings.metrics:
        from .metrics import Metrics

        metrics = Metrics(herald.node)
        operations.append(metrics.running())
    if settings.admin:
        from .admin import Admin

        admin = Admin(herald.node)
        operations.append(admin.running())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(herald.lifespan(app))
            await stack.enter_async_context(demo_context)
            for context in operations:
                await stack.enter_async_context(context)
            # SIGTERM: drain clients (disconnect push + 1012) before uvicorn closes them.
            await stack.enter_async_context(drain_on_signals(herald.node))
            # Everything built so far (FastAPI, pydantic, routes: a few hundred thousand
            # objects) lives as long as the process.  Moving it out of the collector's
            # generations spares every later full collection from walking it again; those
            # walks cost about a fifth of the time of opening 10k connections (bench, idle10k).
            gc.collect()
            gc.freeze()
            yield

    app = FastAPI(
        title="Herald",
        version=__version__,
        summary="Real-time messaging for FastAPI",
        lifespan=lifespan,
        # FastAPI's pages load their assets from CDNs: add_offline_docs serves local ones.
        docs_url=None,
        redoc_url=None,
    )
    app.state.herald = herald
    add_offline_docs(app)
    # Every HTTP request names an allowed Host (DNS-rebinding defence); HTML pages are not
    # framed.  Herald's routes check again themselves, for apps built without create_app.
    app.add_middleware(HostGuardMiddleware, settings=settings)
    app.add_middleware(HeadAsGet)
    app.include_router(herald.router)
    # Herald's WebSocket routes are at the root of this app: serve them natively (under
    # HeraldWebSocketProtocol; see Herald.serve_natively).
    herald.serve_natively(app, ROUTE_NAMES)
    app.include_router(herald.api_router)
    app.include_router(herald.asyncapi_router)  # /asyncapi.json and /asyncapi
    if metrics is not None:
        from .metrics import build_metrics_router

        app.include_router(build_metrics_router(metrics))
    if admin is not None:
        app.include_router(admin.router)

    @app.get("/healthz", tags=["operations"], summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["operations"],
        summary="The node accepts clients and its broker is reachable",
        response_model=None,
    )
    async def readyz() -> JSONResponse:
        node = herald.node
        broker_ok = False
        with contextlib.suppress(Exception):
            broker_ok = await node.broker.ready()
        ready = node.started and not node.closing and broker_ok
        body: dict[str, Any] = {"status": "ready" if ready else "unavailable", "broker": broker_ok}
        return JSONResponse(body, status_code=200 if ready else 503)

    # With the demos off only the JS client (and the admin page's script) stays: the demo
    # pages would otherwise still answer, and work, at their /static/ addresses.
    served = None if settings.demos else CLIENT_FILES | (ADMIN_FILES if settings.admin else frozenset())
    app.mount("/static", HeraldStaticFiles(only=served), name="static")

    if settings.demos:

        @app.get("/", include_in_schema=False)
        async def index() -> RedirectResponse:
            return RedirectResponse("/static/index.html")

    return app


class HeadAsGet:
    """Answer ``HEAD`` wherever ``GET`` is answered: same status and headers, no body.

    FastAPI routes declared with ``@app.get`` answer ``HEAD`` with 405, and load
    balancers and uptime checkers probe with ``HEAD``.  The application sees a ``GET``;
    the body it sends is dropped here (the server drops it too, but not every server
    does).  A path without ``GET`` still answers 405.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            elif message["type"] in ("http.response.pathsend", "http.response.zerocopy"):
                message = {"type": "http.response.body", "body": b""}  # a file's body, sent by the server
            await send(message)

        # A copy: the server keeps its own scope, which must still say HEAD.
        # Stream endpoints (/sse, /stream, /emulation/connect) see the mark and answer
        # their head without opening a stream or a session.
        await self.app({**scope, "method": "GET", HEAD_AS_GET: True}, receive, send_without_body)


def __getattr__(name: str) -> Any:
    # `uvicorn herald.server:app`: build the app lazily, so importing this module is cheap.
    if name == "app":
        import os

        # `herald serve --config FILE` passes the file to (every worker's) app this way.
        application = create_app(Settings.load(os.environ.get("HERALD_CONFIG_FILE") or None))
        globals()["app"] = application
        return application
    raise AttributeError(name)
