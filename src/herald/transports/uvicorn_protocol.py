"""uvicorn's HTTP protocol with a request-header timeout (slow-loris defence).

uvicorn arms no timer until a first request is complete: a client that opens a
TCP connection and sends its headers a byte at a time (or never) holds a socket
and a protocol object for ever.  ``herald serve`` runs this subclass, which
closes a connection whose request headers have not fully arrived within
``HERALD_HTTP_HEADER_TIMEOUT`` seconds (default 10) of the connection opening;
on a kept-alive connection the same bound runs from the first byte of each next
request (rather than relying on uvicorn's keep-alive timer, whose cancelling
depends on when those bytes arrive).  While a request is being served, or once the connection was upgraded to
a WebSocket, the timer is off: uvicorn's keep-alive timeout and Herald's handshake
timeout (4505) apply.

It also hands a connection's first bytes to the WebSocket protocol class when that
class can take them (:meth:`herald.transports.uvicorn.HeraldWebSocketProtocol.take_upgrade`:
a whole upgrade request to a natively served route), without uvicorn's own parsing.

Used as ``uvicorn.run(..., http="herald.transports.uvicorn_protocol:HeaderTimeoutHTTPProtocol")``
(an import string, so that worker processes can load it too).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

logger = logging.getLogger("herald.transport")


def _timeout_from_env() -> float:
    try:
        return max(float(os.environ.get("HERALD_HTTP_HEADER_TIMEOUT", "10")), 0.0)
    except ValueError:
        return 10.0


class HeaderTimeoutHTTPProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """Closes connections whose request headers do not arrive in time."""

    header_timeout: float = _timeout_from_env()

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._fresh = True
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self.header_timeout > 0 and getattr(self, "_header_timer", None) is None:
            self._header_timer = asyncio.get_running_loop().call_later(
                self.header_timeout, self._header_timeout_expired
            )

    def _waiting_for_headers(self) -> bool:
        """No request is being served: the last one (if any) is complete."""
        cycle = self.cycle
        return cycle is None or bool(cycle.response_complete)

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        if self._fresh:
            # A connection's first bytes: an upgrade to a natively served route is taken
            # without uvicorn's HTTP parsing (HeraldWebSocketProtocol.take_upgrade).
            self._fresh = False
            take_upgrade = getattr(self.ws_protocol_class, "take_upgrade", None)
            if take_upgrade is not None and take_upgrade(self, data):
                self._cancel_header_timer()
                self._forget_after_upgrade()
                return
        super().data_received(data)
        if self.transport.get_protocol() is not self:
            self._cancel_header_timer()  # upgraded to a WebSocket
            self._forget_after_upgrade()
        elif not self._waiting_for_headers():
            self._cancel_header_timer()  # a new request cycle: its headers are parsed
        elif self.cycle is not None and not self.transport.is_closing():
            # Bytes of a next request on a kept-alive connection, headers not complete
            # yet (a response cannot complete inside this call, so a finished cycle is
            # the previous request's).
            self._arm_header_timer()

    def _forget_after_upgrade(self) -> None:
        # The WebSocket protocol owns the connection now and this object is dropped.  Its
        # parser holds it back (httptools keeps the protocol's callbacks): without
        # breaking that cycle, every upgrade left ~25 objects (protocol, parser, bound
        # methods, flow control, scope) for the cyclic collector, whose passes then cost
        # about a tenth of a connect storm's CPU (bench S7).
        self.parser = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _header_timeout_expired(self) -> None:
        self._header_timer = None
        if not self._waiting_for_headers() or self.transport.is_closing():
            return
        if self.transport.get_protocol() is not self:
            return
        logger.info(
            "closed %s: request headers not received within %.1f s",
            f"{self.client[0]}:{self.client[1]}" if self.client else "a client",
            self.header_timeout,
        )
        self.transport.abort()


__all__ = ["HeaderTimeoutHTTPProtocol"]
