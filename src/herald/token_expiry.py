"""Token expiry of one protocol connection: ask for a new token in time, then enforce it.

* **Connection token.**  At its ``exp`` the client gets a ``refresh`` push; without a
  ``refresh`` command within ``token_refresh_grace`` seconds the connection is closed
  with 4004 (TOKEN_EXPIRED).
* **Subscription tokens.**  At the ``exp`` of a channel's subscription token the client
  gets a ``sub_refresh`` push; without a ``sub_refresh`` command within the grace the
  subscription ends (the handler's ``on_subscription_expired``: an ``unsubscribe`` push
  with code 112) and the connection stays.

With ``renew`` (the handler's, when ``refresh``/``sub_refresh`` hooks are registered,
e.g. the proxy's), an expiry first goes to ``renew(None)`` (the connection) or
``renew(channel)``: when it returns True the hooks decide, and call :meth:`arm`,
:meth:`arm_channel` or :meth:`ask_client` afterwards.

Timers are ``loop.call_later`` handles, no task: a connection whose tokens never expire
holds none.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .codes import CloseCode
from .protocol.encoders import encode_refresh, encode_sub_refresh

if TYPE_CHECKING:
    from .connection import Connection
    from .node import Node


class TokenExpiry:
    """The expiry timers of one connection's tokens."""

    __slots__ = ("_channels", "_connection", "_node", "_on_subscription_expired", "_renew", "_timer")

    def __init__(
        self,
        node: Node,
        connection: Connection,
        on_subscription_expired: Callable[[str], None],
        renew: Callable[[str | None], bool] | None = None,
    ) -> None:
        self._node = node
        self._connection = connection
        self._on_subscription_expired = on_subscription_expired
        self._renew = renew
        self._timer: asyncio.TimerHandle | None = None
        # channel -> timer of its subscription token (created on first use).
        self._channels: dict[str, asyncio.TimerHandle] | None = None

    # ------------------------------------------------------------ connection token

    def arm(self, expires_at: float | None) -> None:
        """Arm (or re-arm, or with ``expires_at`` None disarm) the connection token's timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if expires_at is None:
            return
        delay = max(expires_at - time.time(), 0.0)
        self._timer = asyncio.get_running_loop().call_later(delay, self._token_expired)

    def _token_expired(self) -> None:
        self._timer = None
        if self._renew is not None and self._renew(None):
            return
        self.ask_client()

    def ask_client(self, channel: str | None = None) -> None:
        """Ask the client for a new token of the connection (or of ``channel``'s
        subscription) and enforce the grace period."""
        if channel is not None:
            self._ask_channel(channel)
            return
        grace = self._node.settings.token_refresh_grace
        self._connection.send(encode_refresh(grace))
        self._timer = asyncio.get_running_loop().call_later(grace, self._refresh_missed)

    def _refresh_missed(self) -> None:
        self._timer = None
        self._node.record_rejected_command("token_expired")
        self._connection.close(CloseCode.TOKEN_EXPIRED, "token expired")

    # ------------------------------------------------------------ subscription tokens

    def arm_channel(self, channel: str, expires_at: float | None) -> None:
        """Arm (or re-arm, or with ``expires_at`` None disarm) the timer that asks for a
        new subscription token of ``channel`` when the current one expires."""
        self.disarm_channel(channel)
        if expires_at is None:
            return
        timers = self._channels
        if timers is None:
            timers = self._channels = {}
        delay = max(expires_at - time.time(), 0.0)
        timers[channel] = asyncio.get_running_loop().call_later(delay, self._channel_token_expired, channel)

    def disarm_channel(self, channel: str) -> None:
        timers = self._channels
        if timers is not None:
            timer = timers.pop(channel, None)
            if timer is not None:
                timer.cancel()

    def _channel_token_expired(self, channel: str) -> None:
        if self._renew is not None and self._renew(channel):
            if self._channels is not None:
                self._channels.pop(channel, None)
            return
        self._ask_channel(channel)

    def _ask_channel(self, channel: str) -> None:
        grace = self._node.settings.token_refresh_grace
        self._connection.send(encode_sub_refresh(channel, grace))
        if self._channels is None:
            self._channels = {}
        self._channels[channel] = asyncio.get_running_loop().call_later(
            grace, self._channel_refresh_missed, channel
        )

    def _channel_refresh_missed(self, channel: str) -> None:
        """No new subscription token in time: end that subscription (not the connection)."""
        if self._channels is not None:
            self._channels.pop(channel, None)
        connection = self._connection
        if channel not in connection.channels or connection.is_closing:
            return
        self._node.record_rejected_command("subscription_token_expired")
        self._on_subscription_expired(channel)

    # ------------------------------------------------------------ end

    def cancel(self) -> None:
        """The connection ended: cancel every timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._channels is not None:
            for timer in self._channels.values():
                timer.cancel()
            self._channels = None
        # The callback is a bound method of the handler that holds this object: drop it so
        # that the pair is freed by reference counting, without waiting for the cycle GC.
        self._on_subscription_expired = _ignore
        self._renew = None


def _ignore(channel: str) -> None:
    pass
