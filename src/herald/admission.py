"""Who may open a WebSocket: the checks every route runs before accept, written once.

Both drivers (native and ASGI) call the route's ``open`` with the handshake's
:class:`~herald.transports.base.Socket`; :func:`opener` makes that ``open``:

1. ``Host`` and ``Origin`` against the allow-lists (:func:`herald.hosts.handshake_refusal`);
2. the per-IP connection limit (the slot is released by the session's ``lost``);
3. the session, which picks its subprotocol with :func:`choose_subprotocol` and arms
   its handshake timeout (:class:`HandshakeTimeout`) when it has one.

A refusal is a reason (the driver answers HTTP 403 and logs it) and is counted in the
node's rejection metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from .hosts import handshake_refusal

if TYPE_CHECKING:
    from .node import Node
    from .transports.base import Session, Socket

S = TypeVar("S", bound="Session")

#: Seconds a busy socket's handshake timeout waits before it looks again.
BUSY_RECHECK = 0.25


def refusal(node: Node, socket: Socket) -> str | None:
    """The reason to refuse ``socket``'s handshake, or None; takes a per-IP slot when
    it lets the socket in (release it with ``node.ip_connections.release(socket.client_ip)``)."""
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
    if not node.ip_connections.acquire(socket.client_ip):
        node.record_rejection("ip_limit")
        return "too many connections from this address"
    return None


def opener(node: Node, make: Callable[[Socket], S]) -> Callable[[Socket], S | str]:
    """A route's ``open``: the admission checks, then ``make(socket)``."""

    def open_session(socket: Socket) -> S | str:
        refused = refusal(node, socket)
        if refused is not None:
            return refused
        try:
            return make(socket)
        except BaseException:
            node.ip_connections.release(socket.client_ip)
            raise

    return open_session


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


__all__ = ["HandshakeTimeout", "choose_subprotocol", "opener", "refusal"]
