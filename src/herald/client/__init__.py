"""Herald's Python client: protocol v1 over one WebSocket, with reconnect and recovery.

::

    from herald.client import Client

    async with Client("ws://127.0.0.1:8000/connect", token=jwt) as client:
        sub = await client.subscribe("chat:lobby")
        await client.publish("chat:lobby", {"text": "hello"})
        async for pub in sub:
            print(pub.offset, pub.data)

Contract (see docs/clients.md):

* **Every wait has a timeout.**  Methods take ``timeout=`` (default: the
  client's ``timeout``) and raise :class:`~herald.exceptions.ClientTimeoutError`.
  An error reply raises :class:`~herald.exceptions.ReplyError` with the
  protocol's error code.
* **Reconnect.**  When the connection drops with a close code that allows it
  (:func:`herald.codes.should_reconnect`: 1001, 1006, 1011-1014, 4000-4499),
  the client reconnects with exponential backoff and full jitter
  (``uniform(0, min(backoff_max, backoff_min * 2**attempt))``), sends
  ``connect`` again and resubscribes every channel.  Codes 4500-4999 (and a
  normal 1000 close) stop it for good: pending waits raise
  :class:`~herald.exceptions.ClientClosedError`.
* **Recovery.**  Each subscription remembers the position (offset, epoch) of
  the last publication it received.  On resubscribe it sends ``since`` = that
  position; the missed publications come in the subscribe reply and are
  delivered in order before any live one, and a publication at or below the
  remembered offset is never delivered twice.  When the server answers
  ``recovered: false`` (history no longer covers the gap, or the epoch
  changed) the subscription's :attr:`Subscription.recovered` is ``False`` and a
  ``recovery_failed`` event fires, so the application can re-sync.
* **Ordering.**  Publications of one subscription are delivered in offset
  order, to its ``on_publication`` callback (awaited one at a time) or to its
  async iterator.  Client events (``connected``, ``disconnected``, ``join``, ...)
  are delivered in order by one task; a failing handler is logged, not raised.
* Commands issued while the client is reconnecting wait for the connection
  (within their timeout).  A command in flight when the connection drops
  raises :class:`~herald.exceptions.ClientConnectionError`; it is not resent,
  because a publish may or may not have happened.  A publish made with an
  ``idempotency_key`` may be retried with the same key: the server publishes it
  once and answers the retry with the original position.
"""

from __future__ import annotations

# Modules, by concept: events (state and event types), subscription (one channel),
# link (one WebSocket), core (lifecycle, events), connection (the connection loop:
# reconnect, resubscribe), client (the commands).  Values and frames come from
# herald.protocol; nothing here imports the server.
from ..protocol.values import (
    ClientInfo,
    ClientPublication,
    HistoryPage,
    JoinEvent,
    LeaveEvent,
    PresenceStats,
    StreamPosition,
)
from .client import Client
from .events import (
    ClientState,
    ConnectedEvent,
    DisconnectedEvent,
    Event,
    EventName,
    RecoveredEvent,
    RecoveryFailedEvent,
    SubscribeErrorEvent,
)
from .link import Token
from .subscription import Since, Subscription, SubscriptionState

__all__ = [
    "Client",
    "ClientInfo",
    "ClientPublication",
    "ClientState",
    "ConnectedEvent",
    "DisconnectedEvent",
    "Event",
    "EventName",
    "HistoryPage",
    "JoinEvent",
    "LeaveEvent",
    "PresenceStats",
    "RecoveredEvent",
    "RecoveryFailedEvent",
    "Since",
    "StreamPosition",
    "SubscribeErrorEvent",
    "Subscription",
    "SubscriptionState",
    "Token",
]
