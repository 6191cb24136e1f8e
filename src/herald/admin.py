"""The admin page at ``/admin``, updated live over Herald itself.

Every node publishes a *snapshot* of itself (connections, channels with
subscriber counts, counters) on the internal channel ``$admin`` once a second
when something changed, and at least every few seconds.  The page opens
``/admin/ws``, proves it knows the API key in its first frame, and is then an
ordinary subscriber of ``$admin``: with a shared broker (Redis, NATS) it hears
the snapshots of every node, which is the node list.  A node publishes only while
a page listens somewhere: on this node, or on a peer whose heartbeats say it
watches ``admin`` (:meth:`herald.membership.Membership.watch`); with no page open
the snapshots cost nothing.

Presence and the publish form use the HTTP API (``/api/presence``,
``/api/publish``) with the same key.

Access: ``settings.api_key`` is required (``X-API-Key`` header for HTTP, first
frame ``{"api_key": "..."}`` on the WebSocket); without a configured key only
loopback clients that name the server by a loopback ``Host`` are let in, like
``/api``.  Every route checks ``Host`` against the allow-list first, ``/admin/ws``
also ``Origin`` and counts against the per-IP connection limit, and the page
may not be framed (``X-Frame-Options: DENY``, ``frame-ancestors 'none'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from importlib import resources
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse
from starlette.routing import WebSocketRoute

from . import __version__
from .admission import HandshakeTimeout, opener
from .apiguard import FRAME_HEADERS_DICT, HttpGate, guarded_route_class
from .auth import api_key_allows
from .brokers.base import Publication
from .codes import CloseCode
from .commands import render_publication
from .connection import Connection
from .periodic import every
from .sessions import RouteSession, end_code, new_connection, record_end
from .transports.asgi import AsgiRoute
from .transports.base import Route, Socket
from .transports.uvicorn import abort_for

if TYPE_CHECKING:
    from .config import Settings
    from .node import Node

logger = logging.getLogger("herald.admin")

ADMIN_CHANNEL = "$admin"
#: What a node with an open admin page says it watches in its heartbeats.
WATCH_NAME = "admin"
#: Seconds between snapshot checks; a snapshot is published when it changed ...
SNAPSHOT_INTERVAL = 1.0
#: ... or when this many seconds passed (so that pages see live nodes).
SNAPSHOT_HEARTBEAT = 5.0
#: Caps that keep one snapshot small on a busy node.
MAX_CLIENTS = 500
MAX_CHANNELS = 1000
AUTH_TIMEOUT = 10.0
#: The largest frame an admin page may send (it sends only its key).
MAX_FRAME = 4096


def key_allows(
    settings: Settings, supplied: str | None, client_host: str | None, host_header: str | None = None
) -> bool:
    """Whether ``supplied`` (the key a client sent) lets it in; see the module docstring
    (``host_header``: the request's ``Host``, None when it had none)."""
    return api_key_allows(settings.api_key, supplied, client_host, host_header)


class Admin:
    """The admin page and its snapshot publisher for one node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.settings = node.settings
        gate = self._gate = HttpGate(node.settings)
        self.router = APIRouter(
            prefix="/admin", include_in_schema=False, route_class=guarded_route_class(gate, require_key=False)
        )
        self._add_routes()
        self._last_snapshot: bytes = b""
        self._last_published = 0.0

    # ------------------------------------------------------------ snapshot

    def snapshot(self) -> dict[str, Any]:
        """This node, as the page shows it."""
        node = self.node
        now = time.monotonic()
        clients: list[dict[str, Any]] = []
        for connection in node.hub.connections():
            if len(clients) >= MAX_CLIENTS:
                break
            clients.append(
                {
                    "client": connection.client_id,
                    "user": connection.user,
                    "remote": connection.remote,
                    "channels": sorted(c for c in connection.channels if not c.startswith("$")),
                    "age": round(now - connection.created_at, 1),
                    "queued": connection.queued[0],
                }
            )
        channels = sorted(
            ((c, n) for c, n in node.hub.channels().items() if not c.startswith("$")),
            key=lambda item: (-item[1], item[0]),
        )[:MAX_CHANNELS]
        return {
            "node": node.id,
            "broker": type(node.broker).__name__.removesuffix("Broker").lower(),
            "version": __version__,
            "uptime": round(time.time() - node.started_at, 1),
            "num_connections": node.hub.connection_count,
            # Distinct non-empty user ids, as presence_stats counts them: anonymous clients
            # are no user (presence.base.presence_stats).
            "num_users": node.hub.user_count,
            "clients": clients,
            "channels": dict(channels),
            "stats": node.stats.as_dict(),
        }

    def _wanted(self) -> bool:
        # A page on another node listens for this node too (its heartbeats say so).
        return bool(self.node.hub.subscriber_count(ADMIN_CHANNEL)) or self.node.control.members.watched(
            WATCH_NAME
        )

    def pages_changed(self) -> None:
        """A page joined or left this node: tell the peers whether one is open here."""
        self.node.control.members.watch(WATCH_NAME, bool(self.node.hub.subscriber_count(ADMIN_CHANNEL)))

    async def publish_snapshot(self, *, force: bool = False) -> bool:
        """Publish a snapshot on ``$admin`` if one is wanted and due; returns whether it did."""
        if not self._wanted() or not self.node.started:
            return False
        body = self.snapshot()
        stats_free = {k: v for k, v in body.items() if k not in ("uptime", "stats")}
        fingerprint = orjson.dumps(stats_free, option=orjson.OPT_SORT_KEYS)
        now = time.monotonic()
        if (
            not force
            and fingerprint == self._last_snapshot
            and now - self._last_published < SNAPSHOT_HEARTBEAT
        ):
            return False
        self._last_snapshot, self._last_published = fingerprint, now
        await self.node.publish_internal(ADMIN_CHANNEL, orjson.dumps(body), None)
        return True

    def running(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Publish snapshots while the application runs (a failed one is retried next tick)."""
        return every(SNAPSHOT_INTERVAL, self.publish_snapshot, name="herald-admin")

    # ------------------------------------------------------------ routes

    def _add_routes(self) -> None:
        settings = self.settings
        router = self.router

        @router.get("", response_class=HTMLResponse)
        async def page() -> HTMLResponse:
            html = (resources.files("herald") / "static" / "admin.html").read_text("utf-8")
            # The page itself holds no data; it asks for the key and uses it for everything.
            return HTMLResponse(html, headers={"Cache-Control": "no-store", **FRAME_HEADERS_DICT})

        @router.get("/snapshot")
        async def snapshot(request: Request) -> dict[str, Any]:
            # The API's own check: the same ways to send the key, the same answers (401 for a
            # missing or wrong key, 403 when no key is set and the request is not loopback).
            denied = self._gate.key_refusal(request.scope)
            if denied is not None:
                raise HTTPException(denied[0], detail=denied[1])
            return self.snapshot()

        # The admin socket is a route like Herald's others (same admission: Host, Origin,
        # per-IP limit); a plain WebSocket route ignores the router's prefix, hence the path.
        endpoint = AsgiRoute(self.route(), fast_path=settings.fast_path, abort_for=abort_for)
        router.routes.append(WebSocketRoute(router.prefix + "/ws", endpoint))

    def route(self) -> Route:
        """``/admin/ws`` as a :class:`~herald.transports.base.Route` (either driver)."""

        def make(socket: Socket) -> AdminSession:
            return AdminSession(self, socket)

        return Route(opener(self.node, make), MAX_FRAME, self.settings.max_message_fragments)


class AdminSession(HandshakeTimeout, RouteSession):
    """``/admin/ws``: the first frame proves the key (``{"api_key": "..."}``), within
    :data:`AUTH_TIMEOUT`; then the page is a subscriber of ``$admin`` and whatever it
    sends is ignored."""

    __slots__ = ("admin", "connection", "timer")

    route_label = "admin"
    timeout_code = CloseCode.HANDSHAKE_TIMEOUT
    timeout_reason = "send the API key first"

    def __init__(self, admin: Admin, socket: Socket) -> None:
        super().__init__(admin.node, socket)
        self.admin = admin
        self.connection: Connection | None = None
        self.timer: asyncio.TimerHandle | None = None

    def started(self) -> None:
        self.arm_handshake_timeout(AUTH_TIMEOUT)

    def handshake_pending(self) -> bool:
        return self.connection is None

    def message(self, data: str | bytes) -> Awaitable[None] | None:
        if self.connection is not None:
            return super().message(data)  # text is ignored, binary closes with 1003
        stats = self.stats
        stats.frames_in += 1
        stats.bytes_in += len(data)
        self.cancel_handshake_timeout()
        supplied: str | None = None
        if isinstance(data, str) and data:
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
                value = orjson.loads(data).get("api_key")
                supplied = value if isinstance(value, str) else None
        socket = self.socket
        client = socket.client
        if not key_allows(
            self.admin.settings, supplied, client[0] if client else None, socket.header("host")
        ):
            self.node.record_rejection("admin_auth")
            self.fail(CloseCode.UNAUTHORIZED, "missing or wrong API key")
            return None
        self.connection = self.count_output(
            new_connection(
                self.admin.settings, socket, render_publication, protocol=False, max_queue_messages=64
            )
        )
        return self._join(self.connection)

    async def _join(self, connection: Connection) -> None:
        node, admin = self.node, self.admin
        connection.start()
        # Not admitted to the node: admin pages are not clients, and are not listed.
        node.hub.subscribe(ADMIN_CHANNEL, connection)
        admin.pages_changed()
        try:
            await node.ensure_broker_subscription(ADMIN_CHANNEL)
            # The page should not wait for the next tick to show something.
            connection.send(render_publication(_local_publication(orjson.dumps(admin.snapshot()))))
            await admin.publish_snapshot(force=True)
        except Exception as exc:
            logger.debug("admin connection failed: %r", exc)
            connection.close(CloseCode.INTERNAL_ERROR, "internal error", push=False)

    def on_text(self, text: str) -> None:
        return None

    def fail(self, code: int, reason: str) -> None:
        if self.connection is not None:
            self.connection.close(code, reason, push=False)
        else:
            self.socket.close_now(code, reason)

    async def lost(self, code: int, reason: str, by_peer: bool) -> None:
        self.cancel_handshake_timeout()
        connection = self.connection
        try:
            if connection is not None:
                record_end(connection, code, reason, by_peer)
                await self.node.unregister(connection, protocol_channels=False)
                self.admin.pages_changed()
                await connection.stop()
        finally:
            self.finish(code if connection is None else end_code(connection, code), connection)


def _local_publication(data: bytes) -> Publication:
    return Publication(ADMIN_CHANNEL, 0, "", data, None)


__all__ = ["ADMIN_CHANNEL", "Admin", "AdminSession", "key_allows"]
