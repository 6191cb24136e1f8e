"""The admin page at ``/admin``, updated live over Herald itself.

Every node publishes a *snapshot* of itself (connections, channels with
subscriber counts, counters) on the internal channel ``$admin`` once a second
when something changed, and at least every few seconds.  The page opens
``/admin/ws``, proves it knows the API key in its first frame, and is then an
ordinary subscriber of ``$admin``: with a shared broker (Redis, NATS) it hears
the snapshots of every node, which is the node list.  With the in-memory broker
a node publishes only while a local admin page listens.

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
from collections.abc import AsyncIterator
from importlib import resources
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, HTTPException, Request, WebSocket
from fastapi.responses import HTMLResponse

from . import __version__
from .apiguard import FRAME_HEADERS_DICT, HttpGate, guarded_route_class, local_address
from .auth import api_key_allows
from .brokers.memory import MemoryBroker
from .codes import CloseCode
from .commands import render_publication
from .connection import Connection
from .hosts import handshake_refusal
from .transports.fastapi import (
    StarletteTransport,
    client_ip,
    close_quietly,
    new_client_id,
    read_loop,
    refuse_handshake,
    remote_address,
    settle,
)

if TYPE_CHECKING:
    from .app import Herald
    from .config import Settings

logger = logging.getLogger("herald.admin")

ADMIN_CHANNEL = "$admin"
#: Seconds between snapshot checks; a snapshot is published when it changed ...
SNAPSHOT_INTERVAL = 1.0
#: ... or when this many seconds passed (so that pages see live nodes).
SNAPSHOT_HEARTBEAT = 5.0
#: Caps that keep one snapshot small on a busy node.
MAX_CLIENTS = 500
MAX_CHANNELS = 1000
AUTH_TIMEOUT = 10.0


def key_allows(
    settings: Settings, supplied: str | None, client_host: str | None, host_header: str | None = None
) -> bool:
    """Whether ``supplied`` (the key a client sent) lets it in; see the module docstring
    (``host_header``: the request's ``Host``, None when it had none)."""
    return api_key_allows(settings.api_key, supplied, client_host, host_header)


class Admin:
    """The admin page and its snapshot publisher for one :class:`~herald.Herald`."""

    def __init__(self, herald: Herald) -> None:
        self.herald = herald
        self.node = herald.node
        gate = HttpGate(herald.settings)
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
            "num_users": node.hub.user_count,
            "clients": clients,
            "channels": dict(channels),
            "stats": dict(node.stats),
        }

    def _wanted(self) -> bool:
        if self.node.hub.subscriber_count(ADMIN_CHANNEL):
            return True
        # With a shared broker, pages on other nodes listen for this node too.
        return not isinstance(self.node.broker, MemoryBroker)

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

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Publish snapshots while the application runs."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(SNAPSHOT_INTERVAL)
                try:
                    await self.publish_snapshot()
                except Exception as exc:  # the broker is down: try again next tick
                    logger.debug("admin snapshot failed: %r", exc)

        task = asyncio.get_running_loop().create_task(loop(), name="herald-admin")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ------------------------------------------------------------ routes

    def _add_routes(self) -> None:
        settings = self.herald.settings
        router = self.router

        @router.get("", response_class=HTMLResponse)
        async def page() -> HTMLResponse:
            html = (resources.files("herald") / "static" / "admin.html").read_text("utf-8")
            # The page itself holds no data; it asks for the key and uses it for everything.
            return HTMLResponse(html, headers={"Cache-Control": "no-store", **FRAME_HEADERS_DICT})

        @router.get("/snapshot")
        async def snapshot(request: Request) -> dict[str, Any]:
            supplied = request.headers.get("x-api-key")
            client_host = request.client.host if request.client else None
            if not key_allows(settings, supplied, client_host, request.headers.get("host")):
                raise HTTPException(401, detail="missing or wrong API key")
            return self.snapshot()

        router.add_api_websocket_route("/ws", self._ws_endpoint)

    async def _ws_endpoint(self, websocket: WebSocket) -> None:
        node, settings = self.node, self.herald.settings
        refusal = handshake_refusal(
            settings,
            host=websocket.headers.get("host"),
            origin=websocket.headers.get("origin"),
            local_address=local_address(websocket.scope),
            scheme=websocket.url.scheme,
        )
        if refusal is not None:
            node.record_rejection(refusal.kind)
            await refuse_handshake(websocket, refusal.reason)
            return
        # An admin page is a WebSocket like any other for the per-IP limit.
        ip = client_ip(websocket)
        if not node.ip_connections.acquire(ip):
            node.record_rejection("ip_limit")
            await refuse_handshake(websocket, "too many connections from this address")
            return
        try:
            await self._serve_ws(websocket)
        finally:
            node.ip_connections.release(ip)

    async def _serve_ws(self, websocket: WebSocket) -> None:
        node, settings = self.node, self.herald.settings
        await websocket.accept()
        try:
            message = await asyncio.wait_for(websocket.receive(), AUTH_TIMEOUT)
        except TimeoutError:
            await close_quietly(websocket, CloseCode.HANDSHAKE_TIMEOUT, "send the API key first")
            return
        supplied: str | None = None
        text = message.get("text")
        if text:
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
                value = orjson.loads(text).get("api_key")
                supplied = value if isinstance(value, str) else None
        host = websocket.client.host if websocket.client else None
        if message["type"] == "websocket.disconnect":
            return
        if not key_allows(settings, supplied, host, websocket.headers.get("host")):
            node.record_rejection("admin_auth")
            await close_quietly(websocket, CloseCode.UNAUTHORIZED, "missing or wrong API key")
            return
        connection = Connection(
            StarletteTransport(websocket),
            new_client_id(),
            renderer=render_publication,
            events=False,
            max_queue_messages=64,
            max_queue_bytes=settings.max_queue_bytes,
            remote=remote_address(websocket),
        )
        connection.start()
        # Not admitted to the node: admin pages are not clients, and are not listed.
        node.hub.subscribe(ADMIN_CHANNEL, connection)
        ending = None
        try:
            await node.ensure_broker_subscription(ADMIN_CHANNEL)
            # The page should not wait for the next tick to show something.
            connection.send(render_publication(_local_publication(orjson.dumps(self.snapshot()))))
            await self.publish_snapshot(force=True)

            async def ignore(_: str) -> None:
                return None

            ending = await read_loop(websocket, ignore, max_size=4096)
        except Exception as exc:
            logger.debug("admin connection ended: %r", exc)
        finally:
            await settle(connection, ending, push=False)
            await node.unregister(connection, protocol_channels=False)
            await connection.stop()


def _local_publication(data: bytes) -> Any:
    from .brokers.base import Publication

    return Publication(ADMIN_CHANNEL, 0, "", data, None)


__all__ = ["ADMIN_CHANNEL", "Admin", "key_allows"]
