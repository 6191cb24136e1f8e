"""uvicorn's wsproto WebSocket protocol with Herald's bounds (``HERALD_WS_IMPL=wsproto``).

Two holes of the plain class are closed:

* **permessage-deflate is never negotiated.**  wsproto inflates a compressed frame
  whole before uvicorn compares the message with ``ws_max_size``: a few KiB of
  deflated zeros became hundreds of MiB in the server.  A client that offers the
  extension gets uncompressed frames (RFC 7692 lets the server decline).
* **Frames per message are bounded** (:func:`~herald.transports.fastpath.fragment_limit`):
  the frame after the limit closes the connection with 1009 and
  :data:`~herald.codes.TOO_MANY_FRAGMENTS`.
* **A frame wsproto cannot parse gets a close frame** (1002, 1007...) before the TCP
  connection is closed; the plain class closed it silently.

A separate module so that ``wsproto`` is imported only when it is the chosen
implementation.
"""

from __future__ import annotations

import asyncio
import copy
import weakref
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.websockets.wsproto_impl import WSProtocol
from wsproto import events
from wsproto.connection import ConnectionState

from ..codes import TOO_MANY_FRAGMENTS
from .fastpath import fragment_limit

__all__ = ["BoundedWSProtocol"]

# The server's config -> the same config with permessage-deflate off, made once per server.
_without_deflate: weakref.WeakKeyDictionary[Config, Config] = weakref.WeakKeyDictionary()


def _no_deflate(config: Config) -> Config:
    if not config.ws_per_message_deflate:
        return config
    plain = _without_deflate.get(config)
    if plain is None:
        if not config.loaded:
            config.load()
        plain = copy.copy(config)
        plain.ws_per_message_deflate = False
        _without_deflate[config] = plain
    return plain


class BoundedWSProtocol(WSProtocol):
    """uvicorn's ``wsproto`` protocol without permessage-deflate and with a bound on the
    frames of one message (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(_no_deflate(config), server_state, app_state, _loop)
        self.max_fragments = fragment_limit()
        self.fragments = 0  # complete frames of the message being received

    def handle_message(self, event: events.TextMessage | events.BytesMessage) -> None:
        # wsproto hands over a frame in pieces as its bytes arrive: count whole frames.
        if event.frame_finished:
            count = self.fragments + 1
            if count > self.max_fragments:
                self._too_many_fragments()
                return
            self.fragments = 0 if event.message_finished else count
        super().handle_message(event)

    def handle_close(self, event: events.CloseConnection) -> None:
        if (
            not self.close_sent
            and self.conn.state is ConnectionState.OPEN
            and not self.transport.is_closing()
        ):
            # wsproto reports a frame it could not parse as a close event without closing
            # its side: send the close frame, so the client learns why.
            self.transport.write(self.conn.send(events.CloseConnection(code=event.code, reason=event.reason)))
        super().handle_close(event)

    def _too_many_fragments(self) -> None:
        reason = TOO_MANY_FRAGMENTS.format(limit=self.max_fragments)
        self.close_sent = True
        self.buffer.clear()
        self.queue.put_nowait({"type": "websocket.disconnect", "code": 1009, "reason": reason})
        if not self.transport.is_closing():
            self.transport.write(self.conn.send(events.CloseConnection(code=1009, reason=reason)))
            self.transport.close()
