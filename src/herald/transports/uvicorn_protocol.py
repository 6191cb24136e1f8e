"""uvicorn's HTTP protocol with a request-header timeout (slow-loris defence).

uvicorn arms no timer until a first request is complete: a client that opens a
TCP connection and sends its headers a byte at a time (or never) holds a socket
and a protocol object for ever.  ``herald serve`` runs this subclass, which
closes a connection whose request headers have not fully arrived within
``HERALD_HTTP_HEADER_TIMEOUT`` seconds (default 10).  Once a request is being
served, or the connection was upgraded to a WebSocket, the timer is off: from
then on uvicorn's keep-alive timeout and Herald's handshake timeout (4505) apply.

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
        if self.header_timeout > 0:
            self._header_timer = asyncio.get_running_loop().call_later(
                self.header_timeout, self._header_timeout_expired
            )

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # A request cycle exists once its headers are parsed; an upgrade hands the
        # transport to the WebSocket protocol.  Either way the headers are complete.
        if self.cycle is not None or self.transport.get_protocol() is not self:
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _header_timeout_expired(self) -> None:
        self._header_timer = None
        if self.cycle is not None or self.transport.is_closing():
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
