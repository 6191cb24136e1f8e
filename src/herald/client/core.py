"""The client's state, lifecycle (connect, close) and event delivery."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self, overload

from ..exceptions import ClientClosedError, ClientError, ClientTimeoutError
from .events import (
    EVENT_NAMES,
    EVENT_TYPES,
    ClientState,
    Event,
    EventName,
    Handler,
)
from .link import Link, Token, describe_error
from .subscription import Subscription, maybe_await

logger = logging.getLogger("herald.client")


class ClientCore:
    """State, lifecycle and events of a :class:`~herald.client.Client`.

    The connection loop (:meth:`_run`) is :class:`~herald.client.connection.ReconnectingClient`'s.
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
        transport: str = "websocket",
    ) -> None:
        if backoff_min <= 0 or backoff_max < backoff_min:
            raise ValueError("need 0 < backoff_min <= backoff_max")
        if transport not in ("websocket", "http_stream"):
            raise ValueError(f"transport must be 'websocket' or 'http_stream', not {transport!r}")
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
        #: ``websocket``, or ``http_stream`` (bidirectional emulation over HTTP, for
        #: networks that break WebSocket upgrades; docs/transports.md).
        self.transport = transport

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
        self._link: Link | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._connected_waiters: list[asyncio.Future[None]] = []
        self._closed_error: ClientClosedError | None = None
        self._closing = False
        self._wake: asyncio.Event | None = None
        self._handlers: dict[str, list[Handler]] = {}
        self._event_waiters: list[tuple[str, Callable[[Any], bool] | None, asyncio.Future[Any]]] = []
        # Events to hand to handlers, each with the subscription's own callback (on_join,
        # on_leave) when it has one: one task delivers both, in order.
        self._events: asyncio.Queue[tuple[Event, Handler | None] | None] | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"<Client {self.url} {self.state.value}>"

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
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
                    f"{exc}; last error: {describe_error(self.last_error)}"
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
        if event not in EVENT_TYPES:
            raise ValueError(f"unknown event {event!r}; one of {', '.join(EVENT_TYPES)}")

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
        if event not in EVENT_TYPES:
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

    def _emit(self, event: Event, callback: Handler | None = None) -> None:
        """Wake the waiters of ``event`` and queue it for the handlers (and ``callback``,
        a subscription's own handler, called first)."""
        name = EVENT_NAMES[type(event)]
        for waited, predicate, future in list(self._event_waiters):
            if waited == name and not future.done():
                try:
                    matched = predicate is None or predicate(event)
                except Exception:
                    logger.exception("wait_for predicate failed")
                    matched = False
                if matched:
                    future.set_result(event)
        if (callback is not None or self._handlers.get(name)) and self._events is not None:
            self._events.put_nowait((event, callback))

    async def _dispatch_events(self) -> None:
        assert self._events is not None
        while True:
            item = await self._events.get()
            if item is None:
                return
            event, callback = item
            name = EVENT_NAMES[type(event)]
            handlers = list(self._handlers.get(name, ()))
            if callback is not None:
                handlers.insert(0, callback)
            for handler in handlers:
                try:
                    await maybe_await(handler(event))
                except Exception:
                    logger.exception("handler for %s failed", name)

    # ------------------------------------------------------------ connection loop

    async def _wait_connected(self, timeout: float | None, what: str) -> Link:
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

    async def _run(self) -> None:
        raise NotImplementedError
