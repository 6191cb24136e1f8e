"""The client's commands: publish, rpc, presence, history, subscribe and the rest."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from ..codes import ErrorCode
from ..exceptions import ClientConnectionError, ClientError, ClientTimeoutError, ReplyError
from ..protocol.decoders import (
    decode_expiry,
    decode_history,
    decode_position,
    decode_presence,
    decode_presence_stats,
    decode_rpc,
    reply_error,
    reply_result,
)
from ..protocol.values import (
    ClientInfo,
    ClientPublication,
    HistoryPage,
    JoinEvent,
    LeaveEvent,
    PresenceStats,
    StreamPosition,
)
from .connection import ReconnectingClient
from .events import ClientState
from .link import RetryableError, Token, call_token
from .subscription import Since, Subscription, SubscriptionState, position_of


class Client(ReconnectingClient):
    """A protocol v1 client for ``ws(s)://host/connect``.

    ``token`` is a JWT string, or a (sync or async) callable returning one,
    called before every connect so that a reconnect can use a fresh token.
    ``backoff_min``/``backoff_max`` bound the reconnect delay in seconds.
    ``timeout`` is the default for every wait.  ``origin`` and ``headers`` are
    sent with the handshake.
    """

    async def _command(self, kind: str, fields: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        """Send a command (waiting for the connection if needed) and return its result."""
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        link = await self._wait_connected(wait, what=kind)
        reply = await self._send(link, {"type": kind, **fields}, max(deadline - time.monotonic(), 0.001))
        error = reply_error(reply)
        if error is not None:
            raise error
        return reply_result(reply)

    async def publish(
        self,
        channel: str,
        data: Any,
        timeout: float | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> StreamPosition:
        """Publish JSON-serialisable ``data``; returns the publication's position.

        With ``idempotency_key`` (1 to 128 visible ASCII characters) the publish is
        safe to retry, after a timeout or a lost connection: the server publishes
        the key on the channel once within its ``idempotency_window`` and answers
        every retry with the original position.
        """
        fields: dict[str, Any] = {"channel": channel, "data": data}
        if idempotency_key is not None:
            fields["idempotency_key"] = idempotency_key
        result = await self._command("publish", fields, timeout)
        return decode_position(result)

    async def rpc(self, method: str, params: Any = None, timeout: float | None = None) -> Any:
        """Call an RPC handler registered with ``@herald.rpc(method)``; returns its data."""
        result = await self._command("rpc", {"method": method, "params": params}, timeout)
        return decode_rpc(result)

    async def presence(self, channel: str, timeout: float | None = None) -> dict[str, ClientInfo]:
        """Who is subscribed to ``channel``: client id -> :class:`ClientInfo`."""
        result = await self._command("presence", {"channel": channel}, timeout)
        return decode_presence(result)

    async def presence_stats(self, channel: str, timeout: float | None = None) -> PresenceStats:
        result = await self._command("presence_stats", {"channel": channel}, timeout)
        return decode_presence_stats(result)

    async def history(
        self,
        channel: str,
        since: Since = None,
        limit: int | None = None,
        reverse: bool = False,
        timeout: float | None = None,
    ) -> HistoryPage:
        """Publications kept for ``channel`` (after ``since`` when given).

        The server caps ``limit`` (``max_history_limit``) and cuts a large reply at its
        byte budget (half the connection's outbound bound), so a page may hold fewer
        publications than asked for: page on with ``since`` = the last one received.
        Raises :class:`ReplyError` with ``UNRECOVERABLE_POSITION`` (119) when
        ``since`` names another epoch.
        """
        fields: dict[str, Any] = {"channel": channel, "reverse": reverse}
        position = position_of(since)
        if position is not None:
            fields["since"] = {"offset": position.offset, "epoch": position.epoch}
        if limit is not None:
            fields["limit"] = limit
        result = await self._command("history", fields, timeout)
        return decode_history(channel, result)

    async def refresh(self, token: str | None = None, timeout: float | None = None) -> float | None:
        """Replace the connection's token (``token``, or a fresh one from the token
        callable); returns its new expiry (Unix time) or None.

        The client does this by itself when the server's ``refresh`` push says the token
        expired and ``token=`` is a callable.
        """
        if token is None:
            token = await self._fresh_token()
        if token is None:
            raise ValueError("no token to refresh with")
        result = await self._command("refresh", {"token": token}, timeout)
        return decode_expiry(result)

    async def ping(self, timeout: float | None = None) -> float:
        """Round trip to the server; returns the seconds it took."""
        started = time.monotonic()
        await self._command("ping", {}, timeout)
        return time.monotonic() - started

    # ------------------------------------------------------------ subscriptions

    def subscription(self, channel: str) -> Subscription | None:
        """The live subscription to ``channel``, if any."""
        return self._subs.get(channel)

    @property
    def subscriptions(self) -> dict[str, Subscription]:
        return dict(self._subs)

    async def subscribe(
        self,
        channel: str,
        on_publication: Callable[[ClientPublication], Any] | None = None,
        since: Since = None,
        timeout: float | None = None,
        token: Token = None,
        on_join: Callable[[JoinEvent], Any] | None = None,
        on_leave: Callable[[LeaveEvent], Any] | None = None,
    ) -> Subscription:
        """Subscribe to ``channel``; returns once the server confirmed it.

        ``token`` is a subscription token (a JWT with ``typ: "subscription"``; needed for
        private channels), or a (sync or async) callable returning one: it is called
        again for each resubscribe after a reconnect and when the server's
        ``sub_refresh`` push says the token expired.  With a fixed string the server
        ends the subscription when it expires (:class:`SubscribeErrorEvent`, code 112).

        With ``on_publication`` (sync or async) publications go to it, one at a
        time in order; without it, read them with ``async for`` or
        :meth:`Subscription.next`.  ``since`` (a position from an earlier
        session) asks for the publications after it first; check
        :attr:`Subscription.recovered`.  The subscription survives reconnects.

        ``on_join`` / ``on_leave`` (sync or async) get this channel's presence pushes
        (:class:`JoinEvent` / :class:`LeaveEvent`, the client's own join included when
        the namespace pushes joins), in order, before the client-wide ``join``/``leave``
        handlers.
        """
        if channel in self._subs:
            raise ReplyError(int(ErrorCode.ALREADY_SUBSCRIBED), f"already subscribed to {channel}")
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        link = await self._wait_connected(wait, what="subscribe")
        try:
            token_value = await call_token(token)
        except RetryableError as exc:
            raise ClientError(f"subscription token for {channel}: {exc.__cause__!r}") from exc.__cause__
        if channel in self._subs:  # subscribed by another task while the token was fetched
            raise ReplyError(int(ErrorCode.ALREADY_SUBSCRIBED), f"already subscribed to {channel}")
        sub = Subscription(self, channel, position_of(since), on_publication, on_join, on_leave)
        sub._token, sub._token_value = token, token_value
        self._subs[channel] = sub
        if sub._link is None and self._link is link:
            frame = self._subscribe_frame(link, [sub])
            self._spawn(self._send_frame(link, frame))
        try:
            await asyncio.wait_for(asyncio.shield(sub._ready), max(deadline - time.monotonic(), 0.001))
        except TimeoutError:
            self._forget(sub)
            raise ClientTimeoutError(f"not subscribed to {channel} within {wait:g}s") from None
        except BaseException:
            self._forget(sub)
            raise
        return sub

    def _forget(self, sub: Subscription) -> None:
        if self._subs.get(sub.channel) is sub:
            del self._subs[sub.channel]
            link = self._link
            if link is not None and sub.state is not SubscriptionState.UNSUBSCRIBED and sub._link is link:
                self._spawn(self._quiet_unsubscribe(link, sub.channel))
        sub._end(None)

    async def unsubscribe(self, channel: str, timeout: float | None = None) -> None:
        """Leave ``channel``: its iterator ends after the publications already received."""
        sub = self._subs.pop(channel, None)
        if sub is None:
            raise ReplyError(int(ErrorCode.NOT_SUBSCRIBED), f"not subscribed to {channel}")
        was_sent = sub._link is not None and sub._link is self._link
        sub._end(None)
        link = self._link
        if link is not None and was_sent and self.state is ClientState.CONNECTED:
            try:
                await self._send(
                    link,
                    {"type": "unsubscribe", "channels": [channel]},
                    self.timeout if timeout is None else timeout,
                )
            except ReplyError as exc:
                if exc.code != ErrorCode.NOT_SUBSCRIBED:
                    raise
            except ClientConnectionError:
                pass  # the server forgets the subscription with the connection
