"""Who may open a WebSocket or an HTTP stream: the checks every route runs, written once.

Both drivers (native and ASGI) call the route's ``open`` with the handshake's
:class:`~herald.transports.base.Socket`; :func:`opener` makes that ``open``:

1. ``Host`` and ``Origin`` against the allow-lists (:func:`herald.hosts.handshake_refusal`);
2. the per-IP connection limit, a lease of ``node.leases`` (:mod:`herald.leases`) held by
   the session (``ip_slot``) and given back by its end (``RouteSession.finish``);
3. the session, which picks its subprotocol with :func:`choose_subprotocol` and arms
   its handshake timeout (:class:`HandshakeTimeout`) when it has one.

``open`` cannot wait, so when the per-IP count is kept across the cluster (a Redis
broker) the handshake only applies this node's own count (enough to refuse), and the
socket is accepted wrapped in :class:`ClusterIpCheck`, which asks the cluster before
the route sees anything and closes with 4503 over the limit.  HTTP streams (``/sse``,
``/stream``, ``/emulation/connect``) can wait before answering: :func:`stream_refusal`
and :func:`async_opener` count across the cluster first and refuse with HTTP 403.

A refusal is a reason (the driver answers HTTP 403 and logs it) and is counted in the
node's rejection metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .codes import CloseCode
from .hosts import handshake_refusal
from .leases import IP

if TYPE_CHECKING:
    from .node import Node
    from .transports.base import Session, Socket

    class AdmittedSession(Session, Protocol):
        """A route's session as admission sees it: its socket, and whether it holds a
        per-IP lease (its end gives it back)."""

        socket: Socket
        ip_slot: bool


S = TypeVar("S", bound="AdmittedSession")

#: Seconds a busy socket's handshake timeout waits before it looks again.
BUSY_RECHECK = 0.25

#: Why a client over ``max_connections_per_ip`` is refused (HTTP 403, or close 4503).
IP_LIMIT_REASON = "too many connections from this address"


def origin_refusal(node: Node, socket: Socket) -> str | None:
    """The reason to refuse ``socket`` for its ``Host`` or ``Origin``, or None."""
    refused = handshake_refusal(
        node.settings,
        host=socket.header("host"),
        origin=socket.header("origin"),
        local_address=socket.local_address,
        scheme=socket.scheme,
    )
    if refused is not None:
        node.record_rejection(refused.kind)
        return refused.reason
    return None


def _ip_refused(node: Node) -> str:
    node.record_rejection("ip_limit")
    return IP_LIMIT_REASON


async def stream_refusal(node: Node, socket: Socket) -> str | None:
    """The reason to refuse an HTTP stream, or None: admitted, holding a per-IP lease
    when ``max_connections_per_ip`` is set (give it back with :func:`release_ip`)."""
    refused = origin_refusal(node, socket)
    if refused is not None:
        return refused
    limit = node.settings.max_connections_per_ip
    if limit > 0 and not await node.leases.acquire(IP, socket.client_ip, limit):
        return _ip_refused(node)
    return None


def release_ip(node: Node, client_ip: str) -> None:
    """Give back the per-IP lease :func:`stream_refusal` took."""
    if node.settings.max_connections_per_ip > 0:
        node.leases.release(IP, client_ip)


def opener(node: Node, make: Callable[[Socket], S]) -> Callable[[Socket], S | ClusterIpCheck | str]:
    """A WebSocket route's ``open``: the admission checks, then ``make(socket)``."""
    limit = node.settings.max_connections_per_ip
    leases = node.leases

    def open_session(socket: Socket) -> S | ClusterIpCheck | str:
        refused = origin_refusal(node, socket)
        if refused is not None:
            return refused
        if limit <= 0:
            return make(socket)
        client_ip = socket.client_ip
        verdict = leases.try_acquire(IP, client_ip, limit)
        if verdict is False:
            return _ip_refused(node)
        try:
            session = make(socket)
        except BaseException:
            if verdict:
                leases.release(IP, client_ip)
            raise
        if verdict is None:
            return ClusterIpCheck(node, session, client_ip, limit)
        session.ip_slot = True
        return session

    return open_session


def async_opener(node: Node, make: Callable[[Socket], S]) -> Callable[[Socket], Coroutine[Any, Any, S | str]]:
    """An HTTP stream's ``open`` (it may wait before answering): :func:`stream_refusal`,
    then ``make(socket)``; the session holds its per-IP lease (``ip_slot``)."""

    async def open_session(socket: Socket) -> S | str:
        refused = await stream_refusal(node, socket)
        if refused is not None:
            return refused
        try:
            session = make(socket)
        except BaseException:
            release_ip(node, socket.client_ip)
            raise
        session.ip_slot = node.settings.max_connections_per_ip > 0
        return session

    return open_session


class ClusterIpCheck:
    """A WebSocket accepted before its per-IP lease is counted across the cluster.

    ``started`` asks the cluster first: over the limit the socket is closed with 4503
    ``too many connections from this address`` (and counted as ``ip_limit``) before the
    route's session sees anything; else the session holds the lease and starts.  The
    session's ``lost`` comes as always (its end gives back a lease only if held).
    """

    __slots__ = ("admitted", "client_ip", "inner", "limit", "node", "subprotocol")

    def __init__(self, node: Node, inner: AdmittedSession, client_ip: str, limit: int) -> None:
        self.node = node
        self.inner = inner
        self.client_ip = client_ip
        self.limit = limit
        self.admitted = False
        self.subprotocol = inner.subprotocol

    def started(self) -> Awaitable[None]:
        return self._start()

    async def _start(self) -> None:
        node, inner = self.node, self.inner
        if not await node.leases.acquire(IP, self.client_ip, self.limit):
            inner.socket.close_now(CloseCode.CONNECTION_LIMIT, _ip_refused(node))
            return
        inner.ip_slot = self.admitted = True
        result = inner.started()
        if result is not None:
            await result

    def message(self, data: str | bytes) -> Awaitable[None] | None:
        # Frames that arrived before a refusal's close are not the route's business.
        return self.inner.message(data) if self.admitted else None

    def fail(self, code: int, reason: str) -> None:
        if self.admitted:
            self.inner.fail(code, reason)
        else:
            self.inner.socket.close_now(code, reason)

    def lost(self, code: int, reason: str, by_peer: bool) -> Awaitable[None] | None:
        return self.inner.lost(code, reason, by_peer)


def choose_subprotocol(offered: Sequence[str], supported: str) -> str | None:
    """The subprotocol to answer with: ``supported`` when the client offered it."""
    return supported if supported in offered else None


class HandshakeTimeout:
    """A mixin for sessions that must hear a handshake message in time (``/connect``'s
    ``connect`` command, the admin page's key).

    :meth:`arm_handshake_timeout` starts the timer; when it fires while
    :meth:`handshake_pending`, the session's ``fail(code, reason)`` closes the socket,
    unless a message is being handled (``socket.busy``: a ``connect`` command is being
    answered), which gets more time.  One timer handle per session, no extra object.
    """

    if not TYPE_CHECKING:
        __slots__ = ()

    timer: asyncio.TimerHandle | None
    socket: Socket
    timeout_code: int
    timeout_reason: str

    if TYPE_CHECKING:  # provided by the session class

        def handshake_pending(self) -> bool: ...

        def fail(self, code: int, reason: str) -> None: ...

    def arm_handshake_timeout(self, delay: float) -> None:
        self.timer = asyncio.get_running_loop().call_later(delay, self._handshake_deadline)

    def _handshake_deadline(self) -> None:
        self.timer = None
        if self.handshake_pending():
            if self.socket.busy:
                self.arm_handshake_timeout(BUSY_RECHECK)
            else:
                self.fail(self.timeout_code, self.timeout_reason)

    def cancel_handshake_timeout(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


__all__ = [
    "IP_LIMIT_REASON",
    "ClusterIpCheck",
    "HandshakeTimeout",
    "async_opener",
    "choose_subprotocol",
    "opener",
    "origin_refusal",
    "release_ip",
    "stream_refusal",
]
