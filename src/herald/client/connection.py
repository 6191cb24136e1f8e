"""The client's connection loop: handshake, reading frames, reconnect with backoff, resubscribe."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI
from websockets.typing import Origin, Subprotocol

from .. import __version__
from ..codes import CloseCode, ErrorCode, should_reconnect
from ..exceptions import (
    ClientClosedError,
    ClientConnectionError,
    ClientError,
    ClientTimeoutError,
    ReplyError,
)
from ..protocol.decoders import (
    DisconnectNotice,
    RefreshRequest,
    SubRefreshRequest,
    SubscribedChannel,
    Unsubscribed,
    decode_connect,
    decode_push,
    decode_subscribed,
    reply_error,
    reply_result,
)
from ..protocol.messages import SUBPROTOCOL
from ..protocol.values import ClientPublication, JoinEvent, LeaveEvent, StreamPosition
from .core import ClientCore
from .events import (
    ClientState,
    ConnectedEvent,
    DisconnectedEvent,
    RecoveredEvent,
    RecoveryFailedEvent,
    SubscribeErrorEvent,
)
from .link import (
    ClientSocket,
    FatalError,
    Link,
    RetryableError,
    call_token,
    consume_result,
    describe_error,
)
from .subscription import Subscription, SubscriptionState

logger = logging.getLogger("herald.client")


class ReconnectingClient(ClientCore):
    """The connection loop: open, connect, read, reconnect with backoff, resubscribe."""

    def _backoff(self, attempt: int) -> float:
        # Full jitter (AWS architecture blog, "Exponential Backoff And Jitter"): spreads a
        # crowd of clients reconnecting after the same outage.
        ceiling = min(self.backoff_max, self.backoff_min * 2 ** min(attempt, 32))
        return random.uniform(self.backoff_min / 2, ceiling)

    async def _sleep(self, delay: float) -> None:
        assert self._wake is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            self.state = ClientState.CONNECTING
            try:
                link = await self._open()
            except FatalError as exc:
                self.last_error = exc.error
                self.close_code, self.close_reason = exc.code, exc.reason
                closed = ClientClosedError(exc.code, exc.reason)
                closed.__cause__ = exc.error
                if self.connections:  # a reconnect was refused for good: say it gave up
                    self._emit(DisconnectedEvent(exc.code, exc.reason, False))
                self._finish(closed)
                return
            except RetryableError as exc:
                self.last_error = exc.__cause__ or exc
                logger.info("connect to %s failed: %s", self.url, describe_error(self.last_error))
                if not self.reconnect:
                    closed = ClientClosedError(1006, describe_error(self.last_error))
                    closed.__cause__ = ClientConnectionError(
                        f"cannot connect to {self.url}: {describe_error(self.last_error)}"
                    )
                    self._finish(closed)
                    return
                await self._sleep(self._backoff(attempt))
                attempt += 1
                continue
            attempt = 0
            code, reason = await self._serve(link)
            self._link = None
            if self.state is not ClientState.CLOSED:
                self.state = ClientState.CONNECTING
            self.close_code, self.close_reason = code, reason
            link.fail(ClientConnectionError(f"connection lost ({code} {reason})".strip()))
            for sub in self._subs.values():
                if sub.state is SubscriptionState.SUBSCRIBED:
                    sub.state = SubscriptionState.SUBSCRIBING
                    sub._ready = asyncio.get_running_loop().create_future()
            again = self.reconnect and not self._closing and should_reconnect(code)
            self._emit(DisconnectedEvent(code, reason, again))
            if not again:
                self._finish(ClientClosedError(code, reason), normal=self._closing)
                return
            await self._sleep(self._backoff(0))

    async def _fresh_token(self) -> str | None:
        """The token to send now: the string, or what the callable returns."""
        return await call_token(self.token)

    async def _open_socket(self) -> ClientSocket:
        """Open the WebSocket (the handshake only).

        Raises :class:`FatalError` when retrying cannot help, :class:`RetryableError`
        otherwise.  :mod:`herald.testing` opens an in-process socket instead.
        """
        if self.transport == "http_stream":
            return await self._open_http_stream()
        try:
            return await websockets.connect(
                self.url,
                subprotocols=[Subprotocol(SUBPROTOCOL)],
                origin=Origin(self.origin) if self.origin else None,
                additional_headers=self.headers or None,
                open_timeout=self.timeout,
                close_timeout=2.0,
                max_size=self.max_size,
            )
        except InvalidURI as exc:
            raise FatalError(
                ClientConnectionError(f"invalid URL {self.url!r}: {exc}"), 1006, str(exc)
            ) from None
        except InvalidStatus as exc:
            status = exc.response.status_code
            body = exc.response.body.decode(errors="replace").strip()[:200] if exc.response.body else ""
            message = f"server refused the handshake with HTTP {status}" + (f": {body}" if body else "")
            if 400 <= status < 500 and status not in (408, 429):
                raise FatalError(ClientConnectionError(message), 1008, message) from None
            raise RetryableError(message) from ClientConnectionError(message)
        except (OSError, TimeoutError, websockets.exceptions.InvalidHandshake) as exc:
            raise RetryableError(str(exc)) from exc

    async def _open_http_stream(self) -> ClientSocket:
        """Open a bidirectional-emulation session (``transport="http_stream"``)."""
        import httpx

        from .http_stream import HttpStreamSocket

        try:
            return await HttpStreamSocket.open(
                self.url, timeout=self.timeout, headers=self.headers, origin=self.origin
            )
        except httpx.HTTPStatusError as exc:
            status = exc.response.status_code
            body = exc.response.text.strip()[:200]
            message = f"server refused the stream with HTTP {status}" + (f": {body}" if body else "")
            if 400 <= status < 500 and status not in (408, 429):
                raise FatalError(ClientConnectionError(message), 1008, message) from None
            raise RetryableError(message) from ClientConnectionError(message)
        except ClientConnectionError as exc:
            raise FatalError(exc, 1006, str(exc)) from None
        except (OSError, TimeoutError, ValueError, httpx.HTTPError) as exc:
            raise RetryableError(str(exc) or type(exc).__name__) from exc

    async def _open(self) -> Link:
        """Open a WebSocket and run the connect command; return the live link."""
        token = await self._fresh_token()
        ws = await self._open_socket()
        link = Link(ws)
        reader = asyncio.get_running_loop().create_task(self._read(link), name="herald-client-reader")
        link.reader = reader
        frame: dict[str, Any] = {"type": "connect", "version": f"herald-python/{__version__}"}
        if token:
            frame["token"] = token
        if self.name:
            frame["name"] = self.name
        try:
            reply = await self._send(link, frame, self.timeout)
        except asyncio.CancelledError:  # close() during the handshake
            ws.transport.abort()
            reader.cancel()
            raise
        except (ClientConnectionError, ClientTimeoutError) as exc:
            await self._drop(link, reader)
            code = ws.close_code
            if code is not None and not should_reconnect(code) and code != 1000:
                reason = ws.close_reason or ""
                raise FatalError(
                    ClientConnectionError(f"server closed the connection: {code} {reason}".strip()),
                    code,
                    reason,
                ) from None
            raise RetryableError(str(exc)) from exc
        error = reply_error(reply)
        if error is not None:
            await self._drop(link, reader)
            retry = {int(ErrorCode.INTERNAL), int(ErrorCode.BROKER_UNAVAILABLE)}
            if callable(self.token):
                retry.add(int(ErrorCode.TOKEN_EXPIRED))
            if error.code in retry:
                raise RetryableError(str(error)) from error
            raise FatalError(error, int(CloseCode.UNAUTHORIZED), error.message)
        connected = decode_connect(reply_result(reply))
        if connected.ping_interval > 0:
            # Silence longer than a ping period plus the pong timeout means a dead peer.
            link.idle_timeout = connected.ping_interval + connected.pong_timeout + 1.0
        self.client_id = connected.client
        self.user = connected.user
        self.connections += 1
        for sub in list(self._subs.values()):
            if callable(sub._token):
                # A fresh subscription token for the resubscribe (the last one may have expired).
                with contextlib.suppress(RetryableError):
                    sub._token_value = await call_token(sub._token)
        # From here to the end of the function there is no await: the resubscribe frame is
        # built and registered before anyone can see the client as connected.
        self._link = link
        self.state = ClientState.CONNECTED
        resubscribe = [s for s in self._subs.values() if s._link is not link]
        sub_frame = self._subscribe_frame(link, resubscribe) if resubscribe else None
        for future in self._connected_waiters:
            if not future.done():
                future.set_result(None)
        self._connected_waiters.clear()
        self._emit(ConnectedEvent(self.client_id, self.user, connected.version, self.connections > 1))
        if sub_frame is not None:
            self._spawn(self._send_frame(link, sub_frame))
        return link

    async def _drop(self, link: Link, reader: asyncio.Task[Any]) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(link.ws.close(1000), 2)
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader

    async def _serve(self, link: Link) -> tuple[int, str]:
        """Wait for the link's reader to end; return the close code and reason."""
        reader = link.reader
        assert reader is not None
        try:
            return await reader
        except Exception as exc:
            logger.exception("client reader failed")
            return 1006, str(exc)

    async def _read(self, link: Link) -> tuple[int, str]:
        ws = link.ws
        try:
            while True:
                try:
                    async with asyncio.timeout(link.idle_timeout):
                        message = await ws.recv()
                except TimeoutError:
                    logger.warning("no frame from %s within %ss: reconnecting", self.url, link.idle_timeout)
                    ws.transport.abort()
                    return 1006, "server stopped answering"
                if isinstance(message, bytes):
                    message = message.decode(errors="replace")
                try:
                    frame = json.loads(message)
                except ValueError:
                    logger.warning("ignoring a malformed frame: %.100s", message)
                    continue
                if not isinstance(frame, dict):
                    continue
                if frame.get("type") == "ping" and frame.get("id") is None:
                    with contextlib.suppress(ConnectionClosed):
                        await ws.send('{"type":"pong"}')
                    continue
                self._handle(link, frame)
        except ConnectionClosed:
            pass
        finally:
            link.fail(ClientConnectionError("connection lost"))
        code = ws.close_code if ws.close_code is not None else 1006
        reason = ws.close_reason or ""
        if link.closed_by is not None and (code == 1006 or not reason):
            code, reason = link.closed_by
        return code, reason

    def _handle(self, link: Link, frame: dict[str, Any]) -> None:
        command_id = frame.get("id")
        if command_id is not None:
            entry = link.pending.pop(command_id, None)
            if entry is None:
                return
            future, on_reply = entry
            if on_reply is not None:
                # Applied here, in the reader, so that recovered publications are queued
                # before any live publication read after this reply.
                try:
                    on_reply(frame)
                except Exception:
                    logger.exception("applying a %s reply failed", frame.get("type"))
            if not future.done():
                future.set_result(frame)
            return
        match decode_push(frame):
            case ClientPublication() as publication:
                sub = self._subs.get(publication.channel)
                if sub is None or sub._link is not link or sub.state is not SubscriptionState.SUBSCRIBED:
                    return
                if sub._deliver(publication):
                    self._emit(publication)
            case JoinEvent() | LeaveEvent() as presence:
                sub = self._subs.get(presence.channel)
                if sub is not None:
                    own = sub.on_join if isinstance(presence, JoinEvent) else sub.on_leave
                    self._emit(presence, own)
            case DisconnectNotice(code=code, reason=reason):
                link.closed_by = (code, reason)
            case RefreshRequest() if callable(self.token):
                # The token expired: send a fresh one within the grace period, or be closed
                # with 4004.  A fixed token string cannot be refreshed: the client then
                # reconnects (4004 is a reconnect code) only if the token is still accepted.
                self._spawn(self._refresh_on_push(link))
            case SubRefreshRequest(channel=channel):
                # A subscription token expired: a callable gives a fresh one within the grace
                # period; otherwise the server ends the subscription (the push below).
                sub = self._subs.get(channel)
                if sub is not None and sub._link is link and callable(sub._token):
                    self._spawn(self._sub_refresh_on_push(link, sub))
            case Unsubscribed(channel=channel, error=error):
                sub = self._subs.get(channel)
                if sub is not None and sub._link is link:
                    del self._subs[sub.channel]
                    sub.state = SubscriptionState.UNSUBSCRIBED
                    sub._end(error)
                    self._emit(SubscribeErrorEvent(sub.channel, error))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _register(
        self,
        link: Link,
        frame: dict[str, Any],
        on_reply: Callable[[dict[str, Any]], None] | None = None,
    ) -> asyncio.Future[dict[str, Any]]:
        command_id = next(self._ids)
        frame["id"] = command_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        link.pending[command_id] = (future, on_reply)
        return future

    async def _send(
        self,
        link: Link,
        frame: dict[str, Any],
        timeout: float,
        on_reply: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        future = self._register(link, frame, on_reply)
        try:
            await link.ws.send(json.dumps(frame, separators=(",", ":")))
        except ConnectionClosed:
            link.pending.pop(frame["id"], None)
            raise ClientConnectionError("connection lost") from None
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            link.pending.pop(frame["id"], None)
            raise ClientTimeoutError(f"no reply to {frame['type']} within {timeout:g}s") from None

    async def _send_frame(self, link: Link, frame: dict[str, Any]) -> None:
        # A frame whose reply is applied by its on_reply handler (resubscribe).
        with contextlib.suppress(ConnectionClosed):
            await link.ws.send(json.dumps(frame, separators=(",", ":")))

    async def _sub_refresh_on_push(self, link: Link, sub: Subscription) -> None:
        try:
            token = await call_token(sub._token)
            if token is None or link is not self._link or self._subs.get(sub.channel) is not sub:
                return
            sub._token_value = token
            frame = {"type": "sub_refresh", "channel": sub.channel, "token": token}
            error = reply_error(await self._send(link, frame, self.timeout))
            if error is not None:
                logger.warning("subscription token refresh for %s refused: %s", sub.channel, error)
        except (ClientError, RetryableError) as exc:
            logger.warning("subscription token refresh for %s failed: %r", sub.channel, exc)

    async def _refresh_on_push(self, link: Link) -> None:
        try:
            token = await self._fresh_token()
            if token is None or link is not self._link:
                return
            error = reply_error(await self._send(link, {"type": "refresh", "token": token}, self.timeout))
            if error is not None:
                logger.warning("token refresh refused: %s", error)
        except (ClientError, RetryableError) as exc:
            logger.warning("token refresh failed: %r", exc)

    async def _quiet_unsubscribe(self, link: Link, channel: str) -> None:
        with contextlib.suppress(ClientError):
            await self._send(link, {"type": "unsubscribe", "channels": [channel]}, self.timeout)

    def _subscribe_frame(self, link: Link, subs: list[Subscription]) -> dict[str, Any]:
        """Build and register a subscribe command for ``subs`` on ``link`` (no await)."""
        items: list[dict[str, Any]] = []
        sent: dict[str, tuple[Subscription, StreamPosition | None]] = {}
        for sub in subs:
            sub._link = link
            item: dict[str, Any] = {"channel": sub.channel}
            if sub._token_value:
                item["token"] = sub._token_value
            # Resume from where we are, unless the channel keeps no history (nothing to resume).
            since = sub.position if (sub.recoverable or not sub._confirmed) else None
            if since is not None:
                item["since"] = {"offset": since.offset, "epoch": since.epoch}
            items.append(item)
            sent[sub.channel] = (sub, since)

        def apply(reply: dict[str, Any]) -> None:
            error = reply_error(reply)
            if error is not None:
                for sub, _ in sent.values():
                    self._subscribe_failed(link, sub, error)
                return
            for result in decode_subscribed(reply_result(reply)):
                entry = sent.get(result.channel)
                if entry is not None:
                    self._apply_subscribed(link, entry[0], entry[1], result)

        frame: dict[str, Any] = {"type": "subscribe", "channels": items}
        future = self._register(link, frame, apply)
        future.add_done_callback(consume_result)
        return frame

    def _subscribe_failed(self, link: Link, sub: Subscription, error: ReplyError) -> None:
        if self._subs.get(sub.channel) is sub:
            del self._subs[sub.channel]
        if not sub._ready.done():
            sub._ready.set_exception(error)
            sub._ready.exception()
        sub._end(error)
        if sub._confirmed:  # a resubscribe after reconnect: nobody awaits subscribe()
            self._emit(SubscribeErrorEvent(sub.channel, error))

    def _apply_subscribed(
        self,
        link: Link,
        sub: Subscription,
        since: StreamPosition | None,
        result: SubscribedChannel,
    ) -> None:
        if self._subs.get(sub.channel) is not sub or sub._link is not link:
            if result.error is None:  # cancelled meanwhile: do not stay subscribed
                self._spawn(self._quiet_unsubscribe(link, sub.channel))
            return
        if result.error is not None:
            self._subscribe_failed(link, sub, result.error)
            return
        top = result.position
        epoch = top.epoch
        sub.recoverable = result.recoverable
        recovered = result.recovered
        if since is not None and recovered is not None:
            if recovered:
                missed = 0
                for publication in result.publications:
                    if sub._deliver(publication):
                        missed += 1
                        self._emit(publication)
                if sub.position is None or sub.position.epoch != epoch or sub.position.offset < top.offset:
                    sub.position = top
                sub.recovered = True
                self._emit(RecoveredEvent(sub.channel, missed, sub.position))
            else:
                sub.recovered = False
                sub.position = top
                self._emit(RecoveryFailedEvent(sub.channel, since, top))
        else:
            sub.position = top
        sub.state = SubscriptionState.SUBSCRIBED
        sub._confirmed = True
        if not sub._ready.done():
            sub._ready.set_result(None)
