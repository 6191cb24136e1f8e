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
  because a publish may or may not have happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import itertools
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeAlias, overload

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI
from websockets.typing import Origin, Subprotocol

from . import __version__
from .brokers.base import ClientInfo, StreamPosition
from .codes import CloseCode, ErrorCode, should_reconnect
from .exceptions import (
    ClientClosedError,
    ClientConnectionError,
    ClientError,
    ClientTimeoutError,
    ReplyError,
)
from .protocol.messages import SUBPROTOCOL

logger = logging.getLogger("herald.client")

Token: TypeAlias = "str | Callable[[], str | Awaitable[str]] | None"
Since: TypeAlias = "StreamPosition | tuple[int, str] | Mapping[str, Any] | None"

# ---------------------------------------------------------------- values and events


class ClientState(enum.Enum):
    """Where a :class:`Client` is in its life."""

    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ClientPublication:
    """A publication received by the client (live, recovered, or from history)."""

    channel: str
    offset: int
    epoch: str
    data: Any
    info: ClientInfo | None = None

    @property
    def position(self) -> StreamPosition:
        return StreamPosition(self.offset, self.epoch)


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """Result of :meth:`Client.history`: publications and the stream's top position."""

    publications: list[ClientPublication]
    position: StreamPosition


@dataclass(frozen=True, slots=True)
class PresenceStats:
    num_clients: int
    num_users: int


@dataclass(frozen=True, slots=True)
class ConnectedEvent:
    """``connected``: a connection was established (``reconnect`` is True after the first)."""

    client: str
    user: str
    version: str
    reconnect: bool


@dataclass(frozen=True, slots=True)
class DisconnectedEvent:
    """``disconnected``: the connection ended with ``code``; ``reconnect`` says whether it retries."""

    code: int
    reason: str
    reconnect: bool


@dataclass(frozen=True, slots=True)
class RecoveredEvent:
    """``recovered``: a subscription resumed with no gap; ``missed`` publications were replayed."""

    channel: str
    missed: int
    position: StreamPosition


@dataclass(frozen=True, slots=True)
class RecoveryFailedEvent:
    """``recovery_failed``: publications after ``previous`` may be lost; re-sync the channel.

    ``position`` is the stream's current top; ``epoch_changed`` tells a reset
    stream (server or broker restarted) from history that no longer reaches back.
    """

    channel: str
    previous: StreamPosition
    position: StreamPosition

    @property
    def epoch_changed(self) -> bool:
        return self.previous.epoch != self.position.epoch


@dataclass(frozen=True, slots=True)
class JoinEvent:
    """``join``: someone subscribed to ``channel``."""

    channel: str
    info: ClientInfo


@dataclass(frozen=True, slots=True)
class LeaveEvent:
    """``leave``: someone left ``channel``."""

    channel: str
    info: ClientInfo


@dataclass(frozen=True, slots=True)
class SubscribeErrorEvent:
    """``subscribe_error``: a resubscribe after reconnect was refused, or the server ended
    the subscription (an ``unsubscribe`` push, e.g. code 112 when its subscription token
    expired and could not be refreshed); the subscription ended."""

    channel: str
    error: ReplyError


Event: TypeAlias = (
    ConnectedEvent
    | DisconnectedEvent
    | RecoveredEvent
    | RecoveryFailedEvent
    | JoinEvent
    | LeaveEvent
    | SubscribeErrorEvent
    | ClientPublication
)

EventName = Literal[
    "connected",
    "disconnected",
    "recovered",
    "recovery_failed",
    "join",
    "leave",
    "subscribe_error",
    "publication",
]

_EVENT_TYPES: dict[str, type[Any]] = {
    "connected": ConnectedEvent,
    "disconnected": DisconnectedEvent,
    "recovered": RecoveredEvent,
    "recovery_failed": RecoveryFailedEvent,
    "join": JoinEvent,
    "leave": LeaveEvent,
    "subscribe_error": SubscribeErrorEvent,
    "publication": ClientPublication,
}
_EVENT_NAMES: dict[type[Any], str] = {kind: name for name, kind in _EVENT_TYPES.items()}

Handler: TypeAlias = Callable[[Any], Any]


def _position(value: Since) -> StreamPosition | None:
    if value is None or isinstance(value, StreamPosition):
        return value
    if isinstance(value, tuple):
        offset, epoch = value
        return StreamPosition(int(offset), str(epoch))
    if isinstance(value, Mapping):
        return StreamPosition(int(value["offset"]), str(value["epoch"]))
    raise TypeError(f"since must be a StreamPosition, (offset, epoch) or a mapping, not {value!r}")


def _info(value: Any) -> ClientInfo | None:
    if not isinstance(value, dict):
        return None
    return ClientInfo(str(value.get("client", "")), str(value.get("user", "")), value.get("info"))


async def _maybe_await(value: Any) -> None:
    if inspect.isawaitable(value):
        await value


class _End:
    """Queue sentinel: the subscription ended (``error`` set when it ended abnormally)."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


# ---------------------------------------------------------------- subscription


class SubscriptionState(enum.Enum):
    SUBSCRIBING = "subscribing"
    SUBSCRIBED = "subscribed"
    UNSUBSCRIBED = "unsubscribed"


class Subscription:
    """One channel the client is subscribed to; an async iterator of its publications.

    Publications are buffered (unbounded) until read, unless ``on_publication``
    was given to :meth:`Client.subscribe`, in which case a task feeds them to it.
    """

    def __init__(
        self,
        client: Client,
        channel: str,
        since: StreamPosition | None,
        on_publication: Callable[[ClientPublication], Any] | None,
    ) -> None:
        self.client = client
        self.channel = channel
        #: Position (offset, epoch) of the last publication received, or of the
        #: stream's top when subscribed; ``None`` until the first subscribe reply.
        self.position: StreamPosition | None = since
        #: ``None`` until a subscribe with ``since``; then whether nothing was missed.
        self.recovered: bool | None = None
        #: Whether the channel keeps history (the server's ``recoverable``).
        self.recoverable = False
        self.state = SubscriptionState.SUBSCRIBING
        self._confirmed = False  # the server confirmed it at least once
        self._queue: asyncio.Queue[ClientPublication | _End] = asyncio.Queue()
        self._ended: _End | None = None
        self._link: _Link | None = None
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._callback = on_publication
        self._task: asyncio.Task[None] | None = None
        #: The subscription token (a string, or a callable giving a fresh one) and the
        #: value last sent (resubscribes after a reconnect send it again, refreshed).
        self._token: Token = None
        self._token_value: str | None = None
        if on_publication is not None:
            self._task = asyncio.get_running_loop().create_task(
                self._feed(on_publication), name=f"herald-client-sub-{channel}"
            )

    def __repr__(self) -> str:
        return f"<Subscription {self.channel} {self.state.value} at {self.position}>"

    # -- reading

    async def next(self, timeout: float | None = None) -> ClientPublication:
        """The next publication; raises :class:`ClientTimeoutError` after ``timeout`` seconds.

        Raises :class:`StopAsyncIteration` once the subscription ended normally
        (unsubscribed, client closed) and :class:`ClientClosedError` or
        :class:`ReplyError` when it ended because of the server.
        """
        if self._callback is not None:
            raise ClientError("this subscription delivers to its on_publication callback")
        if self._ended is not None and self._queue.empty():
            return self._raise_end(self._ended)
        wait = self.client.timeout if timeout is None else timeout
        try:
            item = await asyncio.wait_for(self._queue.get(), wait)
        except TimeoutError:
            raise ClientTimeoutError(f"no publication on {self.channel} within {wait:g}s") from None
        if isinstance(item, _End):
            self._queue.put_nowait(item)  # every later call ends too
            return self._raise_end(item)
        return item

    @staticmethod
    def _raise_end(end: _End) -> ClientPublication:
        if end.error is not None:
            raise end.error
        raise StopAsyncIteration

    def __aiter__(self) -> AsyncIterator[ClientPublication]:
        return self

    async def __anext__(self) -> ClientPublication:
        """Waits without a time limit; use :meth:`next` with a timeout in tests."""
        if self._callback is not None:
            raise ClientError("this subscription delivers to its on_publication callback")
        if self._ended is not None and self._queue.empty():
            return self._raise_end(self._ended)
        item = await self._queue.get()
        if isinstance(item, _End):
            self._queue.put_nowait(item)
            return self._raise_end(item)
        return item

    def pending(self) -> int:
        """Publications received but not read yet."""
        return max(self._queue.qsize() - (1 if self._ended is not None else 0), 0)

    async def unsubscribe(self, timeout: float | None = None) -> None:
        await self.client.unsubscribe(self.channel, timeout=timeout)

    async def wait_subscribed(self, timeout: float | None = None) -> None:
        """Wait until the server confirmed this subscription (again, after a reconnect)."""
        wait = self.client.timeout if timeout is None else timeout
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), wait)
        except TimeoutError:
            raise ClientTimeoutError(f"not subscribed to {self.channel} within {wait:g}s") from None

    # -- fed by the client (synchronously, from its reader)

    def _deliver(self, publication: ClientPublication) -> bool:
        """Queue ``publication`` unless it was already delivered; returns whether it was queued."""
        if self._ended is not None:
            return False
        last = self.position
        if last is not None and publication.epoch == last.epoch and publication.offset <= last.offset:
            return False  # a duplicate: at or below what we already have in this stream
        self.position = publication.position
        self._queue.put_nowait(publication)
        return True

    def _end(self, error: BaseException | None) -> None:
        if self._ended is not None:
            return
        self.state = SubscriptionState.UNSUBSCRIBED
        self._ended = _End(error)
        self._queue.put_nowait(self._ended)
        if not self._ready.done():
            self._ready.set_exception(error or ClientError(f"unsubscribed from {self.channel}"))
            self._ready.exception()  # retrieved: nobody may be waiting

    async def _feed(self, callback: Callable[[ClientPublication], Any]) -> None:
        while True:
            item = await self._queue.get()
            if isinstance(item, _End):
                return
            try:
                await _maybe_await(callback(item))
            except Exception:
                logger.exception("on_publication callback for %s failed", self.channel)


# ---------------------------------------------------------------- one connection


class _Link:
    """One WebSocket connection and the commands in flight on it."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.pending: dict[
            int, tuple[asyncio.Future[dict[str, Any]], Callable[[dict[str, Any]], None] | None]
        ] = {}
        self.idle_timeout: float | None = None
        self.reader: asyncio.Task[tuple[int, str]] | None = None
        self.closed_by: tuple[int, str] | None = None  # from a disconnect push

    def fail(self, error: BaseException) -> None:
        for future, _ in self.pending.values():
            if not future.done():
                future.set_exception(error)
                future.exception()
        self.pending.clear()


class _RetryableError(Exception):
    pass


class _FatalError(Exception):
    def __init__(self, error: ClientError, code: int, reason: str) -> None:
        self.error = error
        self.code = code
        self.reason = reason


# ---------------------------------------------------------------- the client


class Client:
    """A protocol v1 client for ``ws(s)://host/connect``.

    ``token`` is a JWT string, or a (sync or async) callable returning one,
    called before every connect so that a reconnect can use a fresh token.
    ``backoff_min``/``backoff_max`` bound the reconnect delay in seconds.
    ``timeout`` is the default for every wait.  ``origin`` and ``headers`` are
    sent with the handshake.
    """

    def __init__(
        self,
        url: str,
        token: Token = None,
        name: str | None = None,
        *,
        reconnect: bool = True,
        backoff_min: float = 0.5,
        backoff_max: float = 20.0,
        timeout: float = 10.0,
        origin: str | None = None,
        headers: Mapping[str, str] | None = None,
        max_size: int | None = 16 * 1024 * 1024,
    ) -> None:
        if backoff_min <= 0 or backoff_max < backoff_min:
            raise ValueError("need 0 < backoff_min <= backoff_max")
        self.url = url
        self.token = token
        self.name = name
        self.reconnect = reconnect
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.timeout = timeout
        self.origin = origin
        self.headers = dict(headers or {})
        self.max_size = max_size

        self.state = ClientState.NEW
        #: Client id and user id the server assigned on the current connection.
        self.client_id: str | None = None
        self.user: str | None = None
        #: Close code and reason of the last disconnect.
        self.close_code: int | None = None
        self.close_reason = ""
        #: The last error that made a connection attempt fail (for diagnostics).
        self.last_error: BaseException | None = None
        #: Connections established so far (1 after connect, 2 after the first reconnect, ...).
        self.connections = 0

        self._subs: dict[str, Subscription] = {}
        self._ids = itertools.count(1)
        self._link: _Link | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._connected_waiters: list[asyncio.Future[None]] = []
        self._closed_error: ClientClosedError | None = None
        self._closing = False
        self._wake: asyncio.Event | None = None
        self._handlers: dict[str, list[Handler]] = {}
        self._event_waiters: list[tuple[str, Callable[[Any], bool] | None, asyncio.Future[Any]]] = []
        self._events: asyncio.Queue[Event | None] | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"<Client {self.url} {self.state.value}>"

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self.state is ClientState.CONNECTED

    async def connect(self, timeout: float | None = None) -> None:
        """Connect (sending ``connect`` with the token); returns once the server accepted.

        With ``reconnect=True`` failed attempts are retried with backoff until
        ``timeout``; then :class:`ClientTimeoutError` is raised (naming the last
        error) and the client is closed.  An attempt refused for good (HTTP 4xx
        on the handshake, an ``UNAUTHORIZED`` reply, a 45xx close) raises at once:
        :class:`ReplyError` or :class:`ClientConnectionError`.
        """
        if self.state is ClientState.CLOSED:
            raise self._closed_error or ClientClosedError(1000, "client closed")
        if self._run_task is None:
            loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._events = asyncio.Queue()
            self._dispatcher = loop.create_task(self._dispatch_events(), name="herald-client-events")
            self.state = ClientState.CONNECTING
            self._run_task = loop.create_task(self._run(), name="herald-client")
        try:
            await self._wait_connected(timeout, what="connect")
        except ClientTimeoutError as exc:
            await self.close()
            if self.last_error is not None:
                raise ClientTimeoutError(
                    f"{exc}; last error: {_describe(self.last_error)}"
                ) from self.last_error
            raise
        except ClientClosedError as exc:
            await self.close()
            cause = exc.__cause__
            if isinstance(cause, ClientError):
                raise cause from None
            raise

    async def close(self, timeout: float = 5.0) -> None:
        """Close the connection (code 1000) and stop reconnecting; end every subscription."""
        if self._closing:
            if self._run_task is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(self._run_task), timeout)
            return
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        link = self._link
        if link is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(link.ws.close(1000, "client closed"), timeout)
        elif self._run_task is not None:
            self._run_task.cancel()  # connecting or waiting to retry: nothing to close cleanly
        if self._run_task is not None:
            try:
                await asyncio.wait_for(self._run_task, timeout)
            except (TimeoutError, asyncio.CancelledError):
                self._run_task.cancel()
            except Exception:
                logger.exception("client loop failed")
        self._finish(ClientClosedError(1000, "client closed"), normal=True)
        # Let callbacks drain what was already received, then stop them.
        tasks = [s._task for s in list(self._subs.values()) if s._task is not None]
        for sub in list(self._subs.values()):
            sub._end(None)
        self._subs.clear()
        if self._events is not None:
            self._events.put_nowait(None)
        if self._dispatcher is not None:
            tasks.append(self._dispatcher)
        if tasks:
            _done, running = await asyncio.wait(tasks, timeout=timeout)
            for task in running:
                task.cancel()
        for task in list(self._background):
            task.cancel()

    def _finish(self, error: ClientClosedError, *, normal: bool = False) -> None:
        """The client stopped for good: fail every wait with ``error``."""
        if self.state is ClientState.CLOSED:
            return
        self.state = ClientState.CLOSED
        self._closed_error = error
        for future in self._connected_waiters:
            if not future.done():
                future.set_exception(error)
                future.exception()
        self._connected_waiters.clear()
        for _, _, future in self._event_waiters:
            if not future.done():
                future.set_exception(error)
                future.exception()
        self._event_waiters.clear()
        if not normal:
            for sub in list(self._subs.values()):
                sub._end(error)
            self._subs.clear()

    # ------------------------------------------------------------ events

    @overload
    def on(self, event: EventName, handler: None = None) -> Callable[[Handler], Handler]: ...

    @overload
    def on(self, event: EventName, handler: Handler) -> Handler: ...

    def on(self, event: EventName, handler: Handler | None = None) -> Handler | Callable[[Handler], Handler]:
        """Register ``handler(event_object)`` (sync or async) for ``event``; usable as a decorator.

        Events: ``connected`` (:class:`ConnectedEvent`), ``disconnected``
        (:class:`DisconnectedEvent`), ``recovered`` (:class:`RecoveredEvent`),
        ``recovery_failed`` (:class:`RecoveryFailedEvent`), ``join`` / ``leave``
        (:class:`JoinEvent` / :class:`LeaveEvent`), ``subscribe_error``
        (:class:`SubscribeErrorEvent`) and ``publication`` (every
        :class:`ClientPublication` of every subscription).
        """
        if event not in _EVENT_TYPES:
            raise ValueError(f"unknown event {event!r}; one of {', '.join(_EVENT_TYPES)}")

        def register(func: Handler) -> Handler:
            self._handlers.setdefault(event, []).append(func)
            return func

        return register(handler) if handler is not None else register

    async def wait_for(
        self,
        event: EventName,
        timeout: float | None = None,
        predicate: Callable[[Any], bool] | None = None,
    ) -> Any:
        """Wait for the next ``event`` (matching ``predicate``) and return its object.

        Only events that happen after the call count.  For tests::

            failed = await client.wait_for("recovery_failed", timeout=5)
        """
        if event not in _EVENT_TYPES:
            raise ValueError(f"unknown event {event!r}")
        if self.state is ClientState.CLOSED:
            raise self._closed_error or ClientClosedError(1000, "client closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        entry = (event, predicate, future)
        self._event_waiters.append(entry)
        wait = self.timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(future, wait)
        except TimeoutError:
            raise ClientTimeoutError(f"no {event} event within {wait:g}s") from None
        finally:
            with contextlib.suppress(ValueError):
                self._event_waiters.remove(entry)

    def _emit(self, event: Event) -> None:
        name = _EVENT_NAMES[type(event)]
        for waited, predicate, future in list(self._event_waiters):
            if waited == name and not future.done():
                try:
                    matched = predicate is None or predicate(event)
                except Exception:
                    logger.exception("wait_for predicate failed")
                    matched = False
                if matched:
                    future.set_result(event)
        if self._handlers.get(name) and self._events is not None:
            self._events.put_nowait(event)

    async def _dispatch_events(self) -> None:
        assert self._events is not None
        while True:
            event = await self._events.get()
            if event is None:
                return
            for handler in list(self._handlers.get(_EVENT_NAMES[type(event)], ())):
                try:
                    await _maybe_await(handler(event))
                except Exception:
                    logger.exception("handler for %s failed", _EVENT_NAMES[type(event)])

    # ------------------------------------------------------------ connection loop

    async def _wait_connected(self, timeout: float | None, what: str) -> _Link:
        if self.state is ClientState.CONNECTED and self._link is not None:
            return self._link
        if self.state is ClientState.CLOSED:
            raise self._closed_error or ClientClosedError(1000, "client closed")
        if self.state is ClientState.NEW:
            raise ClientError(f"call connect() before {what}")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._connected_waiters.append(future)
        wait = self.timeout if timeout is None else timeout
        try:
            await asyncio.wait_for(future, wait)
        except TimeoutError:
            raise ClientTimeoutError(f"not connected to {self.url} within {wait:g}s") from None
        finally:
            with contextlib.suppress(ValueError):
                self._connected_waiters.remove(future)
        assert self._link is not None
        return self._link

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
            except _FatalError as exc:
                self.last_error = exc.error
                self.close_code, self.close_reason = exc.code, exc.reason
                closed = ClientClosedError(exc.code, exc.reason)
                closed.__cause__ = exc.error
                if self.connections:  # a reconnect was refused for good: say it gave up
                    self._emit(DisconnectedEvent(exc.code, exc.reason, False))
                self._finish(closed)
                return
            except _RetryableError as exc:
                self.last_error = exc.__cause__ or exc
                logger.info("connect to %s failed: %s", self.url, _describe(self.last_error))
                if not self.reconnect:
                    closed = ClientClosedError(1006, _describe(self.last_error))
                    closed.__cause__ = ClientConnectionError(
                        f"cannot connect to {self.url}: {_describe(self.last_error)}"
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
        token = self.token
        if callable(token):
            try:
                value = token()
                token = await value if inspect.isawaitable(value) else value
            except Exception as exc:
                raise _RetryableError("token callable failed") from exc
        return token

    async def _open(self) -> _Link:
        """Open a WebSocket and run the connect command; return the live link."""
        token = await self._fresh_token()
        try:
            ws = await websockets.connect(
                self.url,
                subprotocols=[Subprotocol(SUBPROTOCOL)],
                origin=Origin(self.origin) if self.origin else None,
                additional_headers=self.headers or None,
                open_timeout=self.timeout,
                close_timeout=2.0,
                max_size=self.max_size,
            )
        except InvalidURI as exc:
            raise _FatalError(
                ClientConnectionError(f"invalid URL {self.url!r}: {exc}"), 1006, str(exc)
            ) from None
        except InvalidStatus as exc:
            status = exc.response.status_code
            body = exc.response.body.decode(errors="replace").strip()[:200] if exc.response.body else ""
            message = f"server refused the handshake with HTTP {status}" + (f": {body}" if body else "")
            if 400 <= status < 500 and status not in (408, 429):
                raise _FatalError(ClientConnectionError(message), 1008, message) from None
            raise _RetryableError(message) from ClientConnectionError(message)
        except (OSError, TimeoutError, websockets.exceptions.InvalidHandshake) as exc:
            raise _RetryableError(str(exc)) from exc
        link = _Link(ws)
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
                raise _FatalError(
                    ClientConnectionError(f"server closed the connection: {code} {reason}".strip()),
                    code,
                    reason,
                ) from None
            raise _RetryableError(str(exc)) from exc
        if "error" in reply:
            error = _reply_error(reply)
            await self._drop(link, reader)
            retry = {int(ErrorCode.INTERNAL), int(ErrorCode.BROKER_UNAVAILABLE)}
            if callable(self.token):
                retry.add(int(ErrorCode.TOKEN_EXPIRED))
            if error.code in retry:
                raise _RetryableError(str(error)) from error
            raise _FatalError(error, int(CloseCode.UNAUTHORIZED), error.message)
        result = reply.get("result") or {}
        ping = float(result.get("ping_interval") or 0)
        if ping > 0:
            # Silence longer than a ping period plus the pong timeout means a dead peer.
            link.idle_timeout = ping + float(result.get("pong_timeout") or 10.0) + 1.0
        self.client_id = str(result.get("client", ""))
        self.user = str(result.get("user", ""))
        self.connections += 1
        for sub in list(self._subs.values()):
            if callable(sub._token):
                # A fresh subscription token for the resubscribe (the last one may have expired).
                with contextlib.suppress(_RetryableError):
                    sub._token_value = await _call_token(sub._token)
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
        self._emit(
            ConnectedEvent(self.client_id, self.user, str(result.get("version", "")), self.connections > 1)
        )
        if sub_frame is not None:
            self._spawn(self._send_frame(link, sub_frame))
        return link

    async def _drop(self, link: _Link, reader: asyncio.Task[Any]) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(link.ws.close(1000), 2)
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader

    async def _serve(self, link: _Link) -> tuple[int, str]:
        """Wait for the link's reader to end; return the close code and reason."""
        reader = link.reader
        assert reader is not None
        try:
            return await reader
        except Exception as exc:
            logger.exception("client reader failed")
            return 1006, str(exc)

    async def _read(self, link: _Link) -> tuple[int, str]:
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

    def _handle(self, link: _Link, frame: dict[str, Any]) -> None:
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
        kind = frame.get("type")
        if kind == "publication":
            sub = self._subs.get(str(frame.get("channel")))
            if sub is None or sub._link is not link or sub.state is not SubscriptionState.SUBSCRIBED:
                return
            publication = ClientPublication(
                channel=sub.channel,
                offset=int(frame.get("offset", 0)),
                epoch=str(frame.get("epoch", "")),
                data=frame.get("data"),
                info=_info(frame.get("info")),
            )
            if sub._deliver(publication):
                self._emit(publication)
        elif kind in ("join", "leave"):
            channel = str(frame.get("channel"))
            info = _info(frame.get("info"))
            if info is not None and channel in self._subs:
                self._emit(JoinEvent(channel, info) if kind == "join" else LeaveEvent(channel, info))
        elif kind == "disconnect":
            link.closed_by = (int(frame.get("code", 1006)), str(frame.get("reason", "")))
        elif kind == "refresh" and callable(self.token):
            # The token expired: send a fresh one within the grace period, or be closed
            # with 4004.  A fixed token string cannot be refreshed: the client then
            # reconnects (4004 is a reconnect code) only if the token is still accepted.
            self._spawn(self._refresh_on_push(link))
        elif kind == "sub_refresh":
            # A subscription token expired: a callable gives a fresh one within the grace
            # period; otherwise the server ends the subscription (the push below).
            sub = self._subs.get(str(frame.get("channel")))
            if sub is not None and sub._link is link and callable(sub._token):
                self._spawn(self._sub_refresh_on_push(link, sub))
        elif kind == "unsubscribe":
            sub = self._subs.get(str(frame.get("channel")))
            if sub is not None and sub._link is link:
                del self._subs[sub.channel]
                error = ReplyError(int(frame.get("code", 0)), str(frame.get("reason", "")))
                sub.state = SubscriptionState.UNSUBSCRIBED
                sub._end(error)
                self._emit(SubscribeErrorEvent(sub.channel, error))

    # ------------------------------------------------------------ commands

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _register(
        self,
        link: _Link,
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
        link: _Link,
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

    async def _send_frame(self, link: _Link, frame: dict[str, Any]) -> None:
        # A frame whose reply is applied by its on_reply handler (resubscribe).
        with contextlib.suppress(ConnectionClosed):
            await link.ws.send(json.dumps(frame, separators=(",", ":")))

    async def _command(self, kind: str, fields: dict[str, Any], timeout: float | None) -> dict[str, Any]:
        """Send a command (waiting for the connection if needed) and return its result."""
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        link = await self._wait_connected(wait, what=kind)
        reply = await self._send(link, {"type": kind, **fields}, max(deadline - time.monotonic(), 0.001))
        if "error" in reply:
            raise _reply_error(reply)
        result = reply.get("result")
        return result if isinstance(result, dict) else {}

    async def publish(self, channel: str, data: Any, timeout: float | None = None) -> StreamPosition:
        """Publish JSON-serialisable ``data``; returns the publication's position."""
        result = await self._command("publish", {"channel": channel, "data": data}, timeout)
        return StreamPosition(int(result["offset"]), str(result["epoch"]))

    async def rpc(self, method: str, params: Any = None, timeout: float | None = None) -> Any:
        """Call an RPC handler registered with ``@herald.rpc(method)``; returns its data."""
        result = await self._command("rpc", {"method": method, "params": params}, timeout)
        return result.get("data")

    async def presence(self, channel: str, timeout: float | None = None) -> dict[str, ClientInfo]:
        """Who is subscribed to ``channel``: client id -> :class:`ClientInfo`."""
        result = await self._command("presence", {"channel": channel}, timeout)
        clients = result.get("clients") or {}
        return {client: info for client, value in clients.items() if (info := _info(value)) is not None}

    async def presence_stats(self, channel: str, timeout: float | None = None) -> PresenceStats:
        result = await self._command("presence_stats", {"channel": channel}, timeout)
        return PresenceStats(int(result["num_clients"]), int(result["num_users"]))

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
        position = _position(since)
        if position is not None:
            fields["since"] = {"offset": position.offset, "epoch": position.epoch}
        if limit is not None:
            fields["limit"] = limit
        result = await self._command("history", fields, timeout)
        epoch = str(result["epoch"])
        return HistoryPage(
            publications=[
                ClientPublication(channel, int(p["offset"]), epoch, p.get("data"), _info(p.get("info")))
                for p in result.get("publications") or []
            ],
            position=StreamPosition(int(result["offset"]), epoch),
        )

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
        expires_at = result.get("expires_at")
        return float(expires_at) if expires_at is not None else None

    async def _sub_refresh_on_push(self, link: _Link, sub: Subscription) -> None:
        try:
            token = await _call_token(sub._token)
            if token is None or link is not self._link or self._subs.get(sub.channel) is not sub:
                return
            sub._token_value = token
            frame = {"type": "sub_refresh", "channel": sub.channel, "token": token}
            reply = await self._send(link, frame, self.timeout)
            if "error" in reply:
                logger.warning("subscription token refresh for %s refused: %s", sub.channel, reply["error"])
        except (ClientError, _RetryableError) as exc:
            logger.warning("subscription token refresh for %s failed: %r", sub.channel, exc)

    async def _refresh_on_push(self, link: _Link) -> None:
        try:
            token = await self._fresh_token()
            if token is None or link is not self._link:
                return
            reply = await self._send(link, {"type": "refresh", "token": token}, self.timeout)
            if "error" in reply:
                logger.warning("token refresh refused: %s", reply["error"])
        except (ClientError, _RetryableError) as exc:
            logger.warning("token refresh failed: %r", exc)

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
        """
        if channel in self._subs:
            raise ReplyError(int(ErrorCode.ALREADY_SUBSCRIBED), f"already subscribed to {channel}")
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        link = await self._wait_connected(wait, what="subscribe")
        try:
            token_value = await _call_token(token)
        except _RetryableError as exc:
            raise ClientError(f"subscription token for {channel}: {exc.__cause__!r}") from exc.__cause__
        if channel in self._subs:  # subscribed by another task while the token was fetched
            raise ReplyError(int(ErrorCode.ALREADY_SUBSCRIBED), f"already subscribed to {channel}")
        sub = Subscription(self, channel, _position(since), on_publication)
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

    async def _quiet_unsubscribe(self, link: _Link, channel: str) -> None:
        with contextlib.suppress(ClientError):
            await self._send(link, {"type": "unsubscribe", "channels": [channel]}, self.timeout)

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

    def _subscribe_frame(self, link: _Link, subs: list[Subscription]) -> dict[str, Any]:
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
            if "error" in reply:
                error = _reply_error(reply)
                for sub, _ in sent.values():
                    self._subscribe_failed(link, sub, error)
                return
            for result in (reply.get("result") or {}).get("channels") or []:
                entry = sent.get(str(result.get("channel")))
                if entry is not None:
                    self._apply_subscribed(link, entry[0], entry[1], result)

        frame: dict[str, Any] = {"type": "subscribe", "channels": items}
        future = self._register(link, frame, apply)
        future.add_done_callback(_consume)
        return frame

    def _subscribe_failed(self, link: _Link, sub: Subscription, error: ReplyError) -> None:
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
        link: _Link,
        sub: Subscription,
        since: StreamPosition | None,
        result: dict[str, Any],
    ) -> None:
        if self._subs.get(sub.channel) is not sub or sub._link is not link:
            if "error" not in result:  # cancelled meanwhile: do not stay subscribed
                self._spawn(self._quiet_unsubscribe(link, sub.channel))
            return
        if result.get("error"):
            error = result["error"]
            self._subscribe_failed(
                link, sub, ReplyError(int(error.get("code", 0)), str(error.get("message", "")))
            )
            return
        epoch = str(result.get("epoch") or "")
        top = StreamPosition(int(result.get("offset") or 0), epoch)
        sub.recoverable = bool(result.get("recoverable"))
        recovered = result.get("recovered")
        if since is not None and recovered is not None:
            if recovered:
                missed = 0
                for item in result.get("publications") or []:
                    publication = ClientPublication(
                        sub.channel, int(item["offset"]), epoch, item.get("data"), _info(item.get("info"))
                    )
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


async def _call_token(token: Token) -> str | None:
    """The token ``token`` stands for: the string, or what the callable returns."""
    if not callable(token):
        return token
    try:
        value = token()
        return await value if inspect.isawaitable(value) else value
    except Exception as exc:
        raise _RetryableError("token callable failed") from exc


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _reply_error(reply: dict[str, Any]) -> ReplyError:
    error = reply.get("error") or {}
    return ReplyError(int(error.get("code", 0)), str(error.get("message", "error")))


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    return text


__all__ = [
    "Client",
    "ClientPublication",
    "ClientState",
    "ConnectedEvent",
    "DisconnectedEvent",
    "HistoryPage",
    "JoinEvent",
    "LeaveEvent",
    "PresenceStats",
    "RecoveredEvent",
    "RecoveryFailedEvent",
    "SubscribeErrorEvent",
    "Subscription",
    "SubscriptionState",
]
