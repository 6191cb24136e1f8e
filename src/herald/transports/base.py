"""The contracts between Herald's route code and the drivers that serve it.

* :class:`Transport`: the only thing a :class:`~herald.connection.Connection` knows
  about the network (send a text frame, close).
* :class:`Socket`: what a route's session sees of one WebSocket: the handshake (a
  :class:`~herald.context.Handshake`), the client's address, ``send_now`` and
  ``close_now`` (never waiting), and ``busy`` (a message is being handled).  A socket
  is also the connection's :class:`Transport`.
* :class:`Session`: what a route does with one socket, and :class:`Route`: how a
  path opens sessions (admission included) and bounds their messages.

Two drivers implement :class:`Socket` and call :class:`Session`: the native uvicorn
protocol (:mod:`herald.transports.native`) and the ASGI driver
(:mod:`herald.transports.asgi`) for every other server.  The route code
(:mod:`herald.sessions`, the admin socket) is written once, against these.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Protocol

from .wsreader import DEFAULT_MAX_FRAGMENTS


class Transport(Protocol):
    """Sends text frames to one peer and closes it.

    ``send`` may wait while the peer's socket buffer is full (flow control);
    it raises any exception when the peer is gone.  ``close`` never raises.
    """

    async def send(self, frame: str) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


class DirectWrites(Protocol):
    """The fast path of a transport (:class:`~herald.transports.fastpath.BatchedWrites`):
    synchronous, bounded writes of pre-framed frames, and what they left unwritten."""

    def write_nowait(
        self, frame: str, max_bytes: int, max_messages: int, delay: float = 0.0
    ) -> bool | None: ...

    def unwritten(self) -> tuple[int, int]: ...

    async def drained(self) -> None: ...


class Socket(Transport, Protocol):
    """One accepted (or being accepted) WebSocket, as a route's session uses it.

    The handshake attributes are a :class:`~herald.context.Handshake`.  ``send_now``
    and ``close_now`` never wait: ``send_now`` writes (or, under ASGI, queues behind
    the message being handled); ``close_now`` starts the closing handshake, after
    which the session's ``lost`` is called once.
    """

    @property
    def path(self) -> str: ...

    @property
    def query_string(self) -> bytes: ...

    @property
    def headers(self) -> Sequence[tuple[bytes, bytes]]: ...

    @property
    def client(self) -> tuple[str, int] | None: ...

    @property
    def subprotocols(self) -> Sequence[str]: ...

    @property
    def scope(self) -> MutableMapping[str, Any]: ...

    @property
    def scheme(self) -> str:
        """``ws`` or ``wss`` (as the client reached the server, proxies included)."""

    @property
    def local_address(self) -> str | None:
        """The server side of the connection: its IP, or a Unix socket's path."""

    @property
    def client_ip(self) -> str: ...

    @property
    def remote(self) -> str:
        """``host:port`` of the client, for logs."""

    @property
    def busy(self) -> bool:
        """A message of this socket is being handled."""

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower case), decoded as Latin-1."""

    def send_now(self, message: str | bytes) -> None:
        """Write a text (str) or binary (bytes) message without waiting."""

    def close_now(self, code: int, reason: str) -> None: ...


class Session(Protocol):
    """What a route does with one socket.

    ``subprotocol`` is sent in the handshake response (None: none).  The methods are
    called from the event loop.  ``started``, ``message`` and ``lost`` may return an
    awaitable, which the driver runs to completion before the next message is handed
    over: messages of one socket are handled in order, one at a time, and ``lost``
    comes once, after the last of them.

    A session that checks its peer's liveness itself (protocol pings with a deadline for
    the answer) may have a true ``checks_liveness`` attribute: the drivers then send it
    no WebSocket pings of their own (they would double the pings' writes); under the ASGI
    driver, where the server lets Herald stop them (``herald serve``'s uvicorn protocol).
    """

    subprotocol: str | None

    def started(self) -> Awaitable[None] | None:
        """The handshake was accepted."""

    def message(self, data: str | bytes) -> Awaitable[None] | None:
        """A complete text (str) or binary (bytes) message arrived."""

    def fail(self, code: int, reason: str) -> None:
        """The client broke one of the route's rules (message too big): close it with ``code``."""

    def lost(self, code: int, reason: str, by_peer: bool) -> Awaitable[None] | None:
        """The socket is gone: after the closing handshake started (``code`` from
        whoever closed first), or 1006 when it broke."""


#: Decides on a handshake: a session to accept it with, or the reason to refuse it
#: (HTTP 403).
SessionFactory = Callable[[Socket], "Session | str"]


class Route:
    """A WebSocket route: how to open a session (admission included) and its message
    bounds (bytes, and frames per message).  Both drivers serve the same object."""

    __slots__ = ("max_fragments", "max_size", "open")

    def __init__(
        self, open: SessionFactory, max_size: int, max_fragments: int = DEFAULT_MAX_FRAGMENTS
    ) -> None:
        self.open = open
        self.max_size = max_size
        self.max_fragments = max_fragments


__all__ = ["Route", "Session", "SessionFactory", "Socket", "Transport"]
